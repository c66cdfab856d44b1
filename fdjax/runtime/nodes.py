"""The nodes of a federated-distillation run: clients, two servers and an observer.

Each node is an asyncio loop that calls compiled core programs through the ``Clock`` (which
charges their cost on the node's device) and exchanges parameter pytrees through channels. Nodes
hold no learning math; how they are wired, and the few switches that make the paper's methods
differ, come from ``fdjax.methods``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from fdjax.core import aggregation
from fdjax.runtime.channels import Mailbox, NodeStats, Register, tree_bytes
from fdjax.runtime.clock import Clock, Cost, Device
from fdjax.runtime.compiled import Distiller, Evaluator, LocalTrainer


_fedavg = jax.jit(aggregation.fedavg)
_staleness_mix = jax.jit(aggregation.staleness_mix, static_argnames=("kind",))


@dataclasses.dataclass
class Update:
    """A client's trained model, sent to the averaging server."""

    client: int
    params: Any
    examples: int
    version: int


@dataclasses.dataclass
class Context:
    """What every node shares: the clock, the network channels, the stop signal and a log."""

    clock: Clock
    stop: asyncio.Event
    events: list[dict] = dataclasses.field(default_factory=list)

    def log(self, node: str, event: str, **fields: Any) -> None:
        self.events.append({"time": self.clock.now(), "node": node, "event": event, **fields})


async def _wait(ctx: Context, stats: NodeStats, awaitable) -> Any:
    """Awaits ``awaitable`` and books the time as idle."""
    start = ctx.clock.now()
    try:
        return await awaitable
    finally:
        stats.idle += ctx.clock.now() - start


class Client:
    """Trains the model it is sent for ``epochs`` local epochs and sends it back."""

    def __init__(self, ctx: Context, index: int, device: Device, data: dict, trainer: LocalTrainer,
                 epochs: int, cost: Cost, key: jax.Array, to_server: Mailbox):
        self.ctx, self.index, self.device, self.data = ctx, index, device, data
        self.trainer, self.epochs, self.cost, self.key = trainer, epochs, cost, key
        self.to_server = to_server
        self.inbox = Mailbox(to_server.network)
        self.examples = int(data["labels"].shape[0])
        self.name = f"client{index}"
        self.stats = NodeStats("client")

    def train(self, params: Any, version: int) -> Any:
        state = self.trainer.init(params)
        for epoch in range(self.epochs):
            key = jax.random.fold_in(jax.random.fold_in(self.key, version), epoch)
            state, _ = self.trainer.epoch(state, self.data, key)
        return state.params

    async def run(self) -> None:
        while True:
            params, version = await _wait(self.ctx, self.stats, self.inbox.receive())
            self.ctx.log(self.name, "train_start", version=version)
            trained, charged = await self.ctx.clock.compute(
                self.device, lambda: self.train(params, version), cost=self.cost,
                examples=self.examples * self.epochs, program=(self.trainer, self.examples), node=self.name,
                label="train")
            self.stats.busy += charged
            self.ctx.log(self.name, "train_end", version=version)
            self.to_server.send(Update(self.index, trained, self.examples, version),
                                tree_bytes(trained), self.stats)


class AveragingServer:
    """Runs FedAvg rounds with the clients and publishes each average.

    Args:
        wait_for_distiller: take each round's starting model from the distillation server and
            wait for it (synchronous methods); otherwise rounds run back to back.
        mix_distilled: mix models the distillation server sends between rounds into the
            current model with a staleness weight (the asynchronous forward method).
    """

    def __init__(self, ctx: Context, device: Device, params: Any, clients: list[Client],
                 inbox: Mailbox, cost: Cost, published: Register, wait_for_distiller: bool = False,
                 mix_distilled: bool = False, mix_alpha: float = 0.5,
                 staleness: str = "polynomial", on_round: Callable[[int], None] | None = None):
        self.ctx, self.device, self.params, self.clients = ctx, device, params, clients
        self.cost, self.published = cost, published
        self.wait_for_distiller, self.mix_distilled = wait_for_distiller, mix_distilled
        self.mix_alpha, self.staleness = mix_alpha, staleness
        self.inbox = inbox
        self.from_distiller = Mailbox(published.network)
        self.round = 0
        self.on_round = on_round
        self.name = "averaging"
        self.stats = NodeStats("averaging")
        self.rejected: list[dict] = []

    async def run(self) -> None:
        while True:
            if self.wait_for_distiller:
                self.params = await _wait(self.ctx, self.stats, self.from_distiller.receive())
            elif self.mix_distilled:
                await self._mix_pending()
            nbytes = tree_bytes(self.params)
            for client in self.clients:
                client.inbox.send((self.params, self.round), nbytes, self.stats)
            updates = [await _wait(self.ctx, self.stats, self.inbox.receive())
                       for _ in self.clients]
            accepted = []
            for update in updates:
                reason = aggregation.validate_update(self.params, update.params)
                if reason is None:
                    accepted.append(update)
                else:
                    self.rejected.append({"client": update.client, "reason": reason})
                    self.ctx.log(self.name, "rejected", client=update.client, reason=reason)
            if accepted:
                stacked = aggregation.stack_trees([u.params for u in accepted])
                weights = np.asarray([u.examples for u in accepted], np.float32)
                self.params, charged = await self.ctx.clock.compute(
                    self.device, lambda: _fedavg(stacked, weights), cost=self.cost,
                    examples=len(accepted), program=("fedavg", len(accepted)), node=self.name,
                    label="fedavg")
                self.stats.busy += charged
            self.round += 1
            self.ctx.log(self.name, "round_end", round=self.round, clients=len(accepted))
            self.published.publish(self.params, self.round, tree_bytes(self.params), self.stats)
            if self.on_round is not None:
                self.on_round(self.round)

    async def _mix_pending(self) -> None:
        while self.from_distiller.pending():
            distilled, version = await self.from_distiller.receive()
            staleness = self.round - version
            self.params, charged = await self.ctx.clock.compute(
                self.device, lambda: _staleness_mix(self.params, distilled, staleness,
                                               self.mix_alpha, kind=self.staleness),
                cost=self.cost, examples=1, program="mix", node=self.name, label="mix")
            self.stats.busy += charged
            self.ctx.log(self.name, "mixed", version=version, staleness=staleness)


class DistillationServer:
    """Holds the global (large) model and distils between it and the averaged small model.

    Args:
        mode: "sync" (after each average: reverse distillation, then hand the next round's
            model back and wait), "round" (reverse-distil each new average once, always the
            newest), or "continuous" (never wait after the first average: reverse-distil chunk
            after chunk against the newest average held).
        forward: forward-distil the global model into the small model; in "sync" mode before
            every round, in "continuous" mode after every ``forward_every`` reverse chunks, sent
            to the averaging server to be mixed in.
        forward_cost: how forward distillation is charged (default: as reverse, ``cost``).
    """

    def __init__(self, ctx: Context, device: Device, large_state: Any, reverse: Distiller,
                 forward_distiller: Distiller | None, proxy: dict, cost: Cost, key: jax.Array,
                 averages: Register, averaging: AveragingServer, mode: str,
                 reverse_chunks: int = 1, forward_chunks: int = 1, forward_every: int = 1,
                 forward_cost: Cost | None = None):
        self.ctx, self.device, self.state = ctx, device, large_state
        self.reverse, self.forward_distiller = reverse, forward_distiller
        self.proxy, self.cost = proxy, cost
        self.forward_cost = forward_cost or cost
        self.key, self.forward_key = jax.random.split(key)
        self.averages, self.averaging, self.mode = averages, averaging, mode
        self.reverse_chunks, self.forward_chunks = reverse_chunks, forward_chunks
        self.forward_every = forward_every
        self.examples = int(proxy["images"].shape[0])
        self.chunks = 0
        self.forwards = 0
        self.staleness: list[int] = []
        self.name = "distillation"
        self.stats = NodeStats("distillation")

    @property
    def params(self) -> Any:
        return self.state.params

    async def _reverse(self, teacher: Any, version: int) -> None:
        key = jax.random.fold_in(self.key, self.chunks)
        newest = self.averages.version
        self.staleness.append(self.averaging.round - version)
        (self.state, _), charged = await self.ctx.clock.compute(
            self.device, lambda: self.reverse.chunk(self.state, teacher, self.proxy, key),
            cost=self.cost, examples=self.reverse.steps * self.reverse.batch_size,
            program=self.reverse, node=self.name, label="reverse")
        self.stats.busy += charged
        self.chunks += 1
        self.ctx.log(self.name, "reverse", version=version, staleness=self.staleness[-1],
                     newest=newest)

    async def _forward(self, small: Any, version: int) -> Any:
        distiller = self.forward_distiller
        state = distiller.init(small)
        self.forwards += 1
        for i in range(self.forward_chunks):
            key = jax.random.fold_in(jax.random.fold_in(self.forward_key, self.forwards), i)
            (state, _), charged = await self.ctx.clock.compute(
                self.device, lambda: distiller.chunk(state, self.params, self.proxy, key),
                cost=self.forward_cost, examples=distiller.steps * distiller.batch_size,
                program=distiller, node=self.name, label="forward")
            self.stats.busy += charged
        self.ctx.log(self.name, "forward", version=version)
        return state.params

    async def run(self, initial_small: Any) -> None:
        if self.mode == "sync":
            small, version = initial_small, 0
            while True:
                if self.forward_distiller is not None:
                    small = await self._forward(small, version)
                self.averaging.from_distiller.send(small, tree_bytes(small), self.stats)
                small, version = await _wait(self.ctx, self.stats,
                                             self.averages.wait_newer(version))
                for _ in range(self.reverse_chunks):
                    await self._reverse(small, version)
        elif self.mode == "round":
            version = 0
            while True:
                small, version = await _wait(self.ctx, self.stats,
                                             self.averages.wait_newer(version))
                for _ in range(self.reverse_chunks):
                    await self._reverse(small, version)
        else:  # continuous
            small, version = await _wait(self.ctx, self.stats, self.averages.wait_newer(0))
            while True:
                if self.averages.version > version:
                    small, version = self.averages.value, self.averages.version
                await self._reverse(small, version)
                if self.forward_distiller is not None and self.chunks % self.forward_every == 0:
                    distilled = await self._forward(small, version)
                    self.averaging.from_distiller.send((distilled, version),
                                                       tree_bytes(distilled), self.stats)


class Observer:
    """Evaluates the global and small models every ``interval`` seconds of the run's clock.

    It snapshots the models it is given and charges no node any time: in virtual mode its
    evaluation runs between events without advancing the clock.
    """

    def __init__(self, ctx: Context, interval: float, global_model: Callable[[], Any],
                 small_model: Callable[[], Any] | None, global_eval: Evaluator,
                 small_eval: Evaluator | None, test: dict, on_row: Callable[[dict], None]):
        self.ctx, self.interval = ctx, interval
        self.global_model, self.small_model = global_model, small_model
        self.global_eval, self.small_eval, self.test = global_eval, small_eval, test
        self.on_row = on_row
        self.wall_start = time.perf_counter()

    def evaluate(self) -> dict:
        row = {"time": self.ctx.clock.now(), "wall_time": time.perf_counter() - self.wall_start}
        timed = self.ctx.clock.timed
        row["global_accuracy"] = timed(
            lambda: self.global_eval(self.global_model(), self.test))[0]["accuracy"]
        row["small_accuracy"] = (timed(lambda: self.small_eval(self.small_model(), self.test))[0]
                                 ["accuracy"] if self.small_model is not None else None)
        return row

    async def run(self) -> None:
        while True:
            if self.ctx.clock.virtual:
                row = self.evaluate()
            else:
                row = await asyncio.to_thread(self.evaluate)
            self.on_row(row)
            await self.ctx.clock.sleep(self.interval)
