"""The methods, one module each, registered by name (``fdjax.methods.registry``).

| name | loop |
| --- | --- |
| ``sync-fwd`` | round: forward distillation -> broadcast -> local training -> FedAvg -> reverse distillation (the paper's [1]) |
| ``sync`` | round: broadcast -> local -> FedAvg -> reverse distillation; clients wait during it |
| ``async-round`` | FedAvg rounds back to back; the distillation server reverse-distils each new average once, always the newest |
| ``async-continuous`` | as ``async-round``, but the distillation server never waits: chunk after chunk against the newest average |
| ``async-fwd`` | ``async-continuous`` plus forward distillation run by the distillation server between chunks and mixed into the averaging server's model with a staleness weight (beyond the paper); with ``distill.forward_gate = "lead"`` only while the global model is the more accurate |
| ``fedavg-large`` | clients train the large model directly with FedAvg; no distillation (reference) |
| ``fedbuff`` | clients never wait: the averaging server publishes after every ``aggregation.buffer_size`` updates, each weighted by its staleness (FedBuff); distillation as in ``async-continuous`` |

Importing this package registers the built-in methods, in this order; a researcher's method is a
module that calls ``register`` (see ``fedbuff.py`` and the README's "Adding a method").
"""

from fdjax.methods.registry import (METHODS, Method, get_method, names, paper_methods,
                                    register)
from fdjax.methods import (sync_fwd, sync, async_round, async_continuous,  # noqa: F401
                           async_fwd, fedavg_large, fedbuff)

#: The paper's four methods, in the order of its table.
PAPER_METHODS = paper_methods()

__all__ = ["METHODS", "Method", "PAPER_METHODS", "get_method", "names", "paper_methods",
           "register"]
