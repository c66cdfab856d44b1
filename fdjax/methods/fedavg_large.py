"""``fedavg-large``: the reference without distillation.

The clients train the large (global) model directly with FedAvg; there is no distillation
server, and the global model is the average.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "fedavg-large", "clients train the large model directly with FedAvg; no distillation "
    "(reference)", distill_mode=None, clients_train="large"))
