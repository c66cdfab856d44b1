"""``async-round``: the paper's asynchronous method per round.

FedAvg rounds run back to back, never waiting for the distillation server, which reverse-distils
each new average once (``distill.chunks_per_round`` chunks), always taking the newest one; an
average published while it is busy may be skipped.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "async-round", "FedAvg rounds back to back; the distillation server reverse-distils each new "
    "average once, always the newest", distill_mode="round", paper=True))
