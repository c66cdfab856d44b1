"""``sync-fwd``: the paper's synchronous method with forward distillation (its reference [1]).

Each round: the distillation server forward-distils the global model into the small one and
hands it to the averaging server, which broadcasts it; the clients train; FedAvg; the
distillation server reverse-distils the average into the global model. Clients wait while the
server distils.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "sync-fwd", "round: forward distillation -> broadcast -> local training -> FedAvg -> "
    "reverse distillation (the paper's [1])", distill_mode="sync", forward=True, paper=True))
