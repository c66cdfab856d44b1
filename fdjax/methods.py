"""The methods: each is a wiring of the same nodes with a few switches.

| name | loop |
| --- | --- |
| ``sync-fwd`` | round: forward distillation -> broadcast -> local training -> FedAvg -> reverse distillation (the paper's [1]) |
| ``sync`` | round: broadcast -> local -> FedAvg -> reverse distillation; clients wait during it |
| ``async-round`` | FedAvg rounds back to back; the distillation server reverse-distils each new average once, always the newest |
| ``async-continuous`` | as ``async-round``, but the distillation server never waits: chunk after chunk against the newest average |
| ``async-fwd`` | ``async-continuous`` plus forward distillation run by the distillation server between chunks and mixed into the averaging server's model with a staleness weight (beyond the paper); with ``distill.forward_gate = "lead"`` only while the global model is the more accurate |
| ``fedavg-large`` | clients train the large model directly with FedAvg; no distillation (reference) |
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method wires the nodes.

    Attributes:
        name: the method's name.
        distill_mode: the distillation server's loop ("sync", "round", "continuous"), or None
            when there is no distillation server.
        forward: whether the distillation server also runs forward distillation.
        clients_train: which model clients train, "small" or "large".
    """

    name: str
    distill_mode: str | None
    forward: bool
    clients_train: str

    @property
    def waits_for_distiller(self) -> bool:
        """The averaging server takes each round's model from the distillation server."""
        return self.distill_mode == "sync"

    @property
    def mixes_distilled(self) -> bool:
        """The averaging server mixes asynchronously forward-distilled models in."""
        return self.distill_mode == "continuous" and self.forward


METHODS = {m.name: m for m in (
    Method("sync-fwd", "sync", True, "small"),
    Method("sync", "sync", False, "small"),
    Method("async-round", "round", False, "small"),
    Method("async-continuous", "continuous", False, "small"),
    Method("async-fwd", "continuous", True, "small"),
    Method("fedavg-large", None, False, "large"),
)}

#: The paper's four methods, in the order of its table.
PAPER_METHODS = ("sync-fwd", "sync", "async-round", "async-continuous")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]
