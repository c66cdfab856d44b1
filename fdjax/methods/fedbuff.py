"""``fedbuff``: buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022).

Clients never wait for a round: each trains as soon as it holds a model and sends its update,
and is served the current model again at once. The averaging server keeps each accepted update's
change from the model it was served in a buffer, and after every ``K`` of them
(``aggregation.buffer_size``) publishes a new model: the buffer's changes weighted by examples
and by a staleness function of how many versions each was behind (``aggregation.staleness``:
constant, polynomial or hinge, with ``staleness_a``/``staleness_b``), scaled by
``aggregation.server_learning_rate`` (``fdjax.core.aggregation.buffered_update``). An update more
than ``aggregation.max_staleness`` versions behind is dropped (counted in ``stale_dropped``).
The distillation server runs as in ``async-continuous``, against the newest published model.

This file is the worked example of adding a method (see the README): a subclass of
``AveragingServer`` that overrides its loop, and one ``register`` call. Validation of every
update, client sampling (a published version serves the idle clients sampled for it), faults
(joins, crashes, corrupt updates), checkpoints (taken right after a publish, when the buffer is
empty) and the Ray backend come from the shared nodes unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fdjax.core import aggregation
from fdjax.methods.registry import Method, register
from fdjax.runtime.executors import Program
from fdjax.runtime.nodes import AveragingServer, Update, _wait


def buffered_models(params: Any, models: Sequence[Any], bases: Sequence[Any], examples: Any,
                    staleness: Any, **settings: Any) -> Any:
    """``aggregation.buffered_update`` of lists of models and their bases, stacked inside the
    compiled program (one call, not an eager stacking op per leaf)."""
    return aggregation.buffered_update(params, aggregation.stack_trees(models),
                                       aggregation.stack_trees(bases), examples, staleness,
                                       **settings)


#: The server step, compiled once per process wherever the averaging server's executor runs it.
buffered_step = Program(buffered_models, ("kind", "clip_norm"))


class FedBuffServer(AveragingServer):
    """An averaging server that publishes after every ``buffer_size`` updates instead of rounds.

    Args (beyond ``AveragingServer``'s):
        buffer_size: ``K``, the updates per published model.
        max_staleness: drop updates built on a model more than this many versions old (None:
            keep every one).
        buffer_staleness, buffer_staleness_a, buffer_staleness_b: the staleness function.
        server_lr: the server's step on the buffer's weighted change.
    """

    def __init__(self, *args: Any, buffer_size: int = 2, max_staleness: int | None = None,
                 buffer_staleness: str = "polynomial", buffer_staleness_a: float = 0.5,
                 buffer_staleness_b: float = 4.0, server_lr: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.buffer_size, self.max_staleness = buffer_size, max_staleness
        self.kind, self.a, self.b = buffer_staleness, buffer_staleness_a, buffer_staleness_b
        self.server_lr = server_lr
        #: (update, the model it was trained from, staleness) of each buffered update
        self.buffer: list[tuple[Update, Any, int]] = []
        #: version -> the model published as it, while a client still trains on it
        self.bases: dict[int, Any] = {}
        self.stale_dropped = 0

    async def run(self) -> None:
        self._serve_sampled()
        while True:
            message = await _wait(self.ctx, self.stats, self.inbox.receive())
            if self._join(message):
                continue
            if isinstance(message, Update):
                self._take(message)
                if len(self.buffer) >= self.buffer_size:
                    await self._publish()
                    self._serve_sampled()
                elif message.client in self._sampled():
                    self._serve(message.client)

    def _sampled(self) -> set[int]:
        """The clients that may train on the current version."""
        if self.sample is None:
            return set(range(len(self.clients)))
        return set(self.sample(self.round))

    def _serve(self, index: int) -> None:
        self.bases[self.round] = self.params
        super()._serve(index)

    def _serve_sampled(self) -> None:
        """Serves the current model to every sampled client that holds no model."""
        for index in sorted(self._sampled() - set(self.serving)):
            self._serve(index)

    def _take(self, message: Update) -> None:
        """Checks an update and buffers its change, or drops it as too stale."""
        served = self.serving.get(message.client)
        update = self._admit(message)
        if update is not None:
            staleness = self.round - update.version
            if self.max_staleness is not None and staleness > self.max_staleness:
                self.stale_dropped += 1
                self.ctx.log(self.name, "stale_dropped", client=update.client,
                             staleness=staleness)
            else:
                self.buffer.append((update, self.bases[served], staleness))
        held = set(self.serving.values()) | {self.round}
        self.bases = {v: p for v, p in self.bases.items() if v in held}

    async def _publish(self) -> None:
        updates, bases, staleness = zip(*self.buffer)
        models = [u.params for u in updates]
        self.members = tuple(models)
        examples = np.asarray([u.examples for u in updates], np.float32)
        self.params, charged = await self.ctx.clock.compute(
            self.device, lambda: self.apply_buffer(models, list(bases), examples,
                                                   np.asarray(staleness, np.int32)),
            cost=self.cost, examples=len(updates), program=("fedbuff", len(updates)),
            node=self.name, label="fedbuff")
        self.stats.busy += charged
        self.buffer = []
        self._end_round(len(updates))

    def apply_buffer(self, models: Sequence[Any], bases: Sequence[Any], examples: np.ndarray,
                     staleness: np.ndarray) -> Any:
        """The computation of a publish (``aggregation.buffered_update`` of the buffer's models
        and the models they were trained from)."""
        return self.executor.call(buffered_step, self.params, models, bases, examples, staleness,
                                  kind=self.kind, a=self.a, b=self.b, server_lr=self.server_lr,
                                  clip_norm=self.rule.clip_norm)

    def counters(self) -> dict:
        return {**super().counters(), "stale_dropped": self.stale_dropped}

    def snapshot(self) -> tuple[dict, dict]:
        """As ``AveragingServer.snapshot``: taken right after a publish, the buffer is empty."""
        arrays, meta = super().snapshot()
        return arrays, {**meta, "stale_dropped": self.stale_dropped}

    def restore(self, arrays: dict, meta: dict) -> None:
        super().restore(arrays, meta)
        self.stale_dropped = meta["stale_dropped"]
        self.buffer, self.bases = [], {self.round: self.params}


def _options(config: Any) -> dict:
    a = config.aggregation
    return {"buffer_size": a.buffer_size, "max_staleness": a.max_staleness,
            "buffer_staleness": a.staleness, "buffer_staleness_a": a.staleness_a,
            "buffer_staleness_b": a.staleness_b, "server_lr": a.server_learning_rate}


def _check(config: Any) -> str | None:
    a = config.aggregation
    if a.rule != "fedavg":
        return (f"aggregation.rule: fedbuff adds its buffer's staleness-weighted changes; the "
                f"robust rules combine whole rounds, so it needs \"fedavg\", got {a.rule!r}")
    if a.round_timeout is not None:
        return "aggregation.round_timeout: fedbuff has no rounds to time out; leave it unset"
    return None


METHOD = register(Method(
    "fedbuff", "clients never wait: the averaging server publishes after every "
    "aggregation.buffer_size updates, each weighted by its staleness (FedBuff); distillation "
    "as in async-continuous", distill_mode="continuous", averaging=FedBuffServer,
    options=_options, check=_check))
