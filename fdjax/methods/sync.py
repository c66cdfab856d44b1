"""``sync``: as ``sync-fwd`` without forward distillation.

Each round: broadcast, local training, FedAvg, reverse distillation of the average into the
global model; the next round starts from the average once the distillation is done, so clients
wait for it.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "sync", "round: broadcast -> local -> FedAvg -> reverse distillation; clients wait during it",
    distill_mode="sync", paper=True))
