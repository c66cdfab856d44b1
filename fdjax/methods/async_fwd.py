"""``async-fwd``: ``async-continuous`` plus forward distillation (beyond the paper).

Every ``distill.forward_every`` reverse chunks the distillation server forward-distils the global
model into the newest average and sends it to the averaging server, which mixes it into its model
with a staleness weight (``distill.mix_alpha``, ``distill.staleness``). With
``distill.forward_gate = "lead"`` it does so only while the global model is the more accurate of
the two on a labeled holdout.
"""

from fdjax.methods.registry import Method, register

METHOD = register(Method(
    "async-fwd", "async-continuous plus forward distillation between chunks, mixed into the "
    "averaging server's model with a staleness weight (beyond the paper); with "
    "distill.forward_gate = \"lead\" only while the global model is the more accurate",
    distill_mode="continuous", forward=True))
