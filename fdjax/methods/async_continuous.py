"""``async-continuous``: the paper's fastest method.

As ``async-round``, but after the first average the distillation server never waits: it
reverse-distils chunk after chunk against the newest average it holds.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "async-continuous", "as async-round, but the distillation server never waits: chunk after "
    "chunk against the newest average", distill_mode="continuous", paper=True))
