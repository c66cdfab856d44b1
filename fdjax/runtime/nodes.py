"""The nodes of a federated-distillation run: clients, two servers and an observer.

Each node is an asyncio loop that calls compiled core programs through the ``Clock`` (which
charges their cost on the node's device) and exchanges parameter pytrees through channels. Nodes
hold no learning math; how they are wired, and the few switches that make the paper's methods
differ, come from ``fdjax.methods`` (where a method may also bring its own averaging loop, a
subclass of ``AveragingServer``).

Faults are part of the protocol, not an afterthought: the averaging server checks every message
before it touches its state, closes a round on a timeout with a quorum, and serves a client that
comes back the current model; a client that crashes is logged and, where it restarts, rejoins
(``supervise``). Servers expose ``snapshot``/``restore`` so a run can be checkpointed and resumed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import typing
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fdjax.core import aggregation
from fdjax.runtime.channels import Mailbox, NodeStats, Register, tree_bytes
from fdjax.runtime.clock import Clock, Cost, Device
from fdjax.runtime.compiled import Distiller, Evaluator, LocalTrainer
from fdjax.runtime.executors import InProcess, Program, fold_in


def aggregate_models(models: Sequence[Any], weights: Any, *, rule: aggregation.AggregationRule,
                     reference: Any = None) -> Any:
    """``aggregation.aggregate`` of a list of client models, stacked inside the compiled
    program: one call instead of an eager stacking op per leaf before it (which cost more than
    the averaging itself on small models), compiled per number of models as the rule is."""
    return aggregation.aggregate(aggregation.stack_trees(models), weights, rule=rule,
                                 reference=reference)


#: The averaging server's computations, compiled once per process; handed to its executor, so a
#: backend running them elsewhere (a Ray actor) runs the very same programs.
aggregate_updates = Program(aggregate_models, ("rule",))
mix_stale = Program(aggregation.staleness_mix, ("kind",))


class RoundModels(typing.NamedTuple):
    """What the averaging server publishes with ``distill.teacher = "ensemble"``: the averaged
    small model and the client models it averaged (a pytree, so it travels as one message and
    is sized as the sum of its models)."""

    average: Any
    members: tuple


@dataclasses.dataclass
class Update:
    """A client's trained model, sent to the averaging server."""

    client: int
    params: Any
    examples: int
    version: int


@dataclasses.dataclass
class Join:
    """A client that (re)starts asks the averaging server for the current model."""

    client: int


@dataclasses.dataclass
class _Deadline:
    """The averaging server's round timer going off (a message to itself)."""

    round: int


#: Events that mean something went wrong somewhere; they also go to the ``fdjax`` logger.
_WARNINGS = ("rejected", "crashed", "round_timeout")
_logger = logging.getLogger("fdjax")


@dataclasses.dataclass
class Context:
    """What every node shares: the clock, the network channels, the stop signal and a log."""

    clock: Clock
    stop: asyncio.Event
    events: list[dict] = dataclasses.field(default_factory=list)

    def log(self, node: str, event: str, **fields: Any) -> None:
        self.events.append({"time": self.clock.now(), "node": node, "event": event, **fields})
        if event in _WARNINGS:
            details = ", ".join(f"{k}={v}" for k, v in fields.items())
            _logger.warning("%s at %.3f s: %s (%s)", node, self.clock.now(), event, details)


async def _wait(ctx: Context, stats: NodeStats, awaitable) -> Any:
    """Awaits ``awaitable`` and books the time as idle."""
    start = ctx.clock.now()
    try:
        return await awaitable
    finally:
        stats.idle += ctx.clock.now() - start


class Client:
    """Trains the model it is sent for ``epochs`` local epochs and sends it back.

    Attributes:
        restart_after: seconds after a crash until the client is back and asks for the current
            model (None: it never comes back); read by ``supervise``.
    """

    restart_after: float | None = None

    def __init__(self, ctx: Context, index: int, device: Device, data: dict, trainer: LocalTrainer,
                 epochs: int, cost: Cost, key: jax.Array, to_server: Mailbox,
                 executor: Any = None):
        self.ctx, self.index, self.device, self.data = ctx, index, device, data
        self.trainer, self.epochs, self.cost, self.key = trainer, epochs, cost, key
        #: where its training runs (``fdjax.runtime.executors``): here, with its data, by default
        self.executor = executor or InProcess({"trainer": trainer}, data)
        self.to_server = to_server
        self.inbox = Mailbox(to_server.network)
        self.examples = int(data["labels"].shape[0])
        self.name = f"client{index}"
        self.stats = NodeStats("client")
        self.crashes = 0

    def train(self, params: Any, version: int) -> Any:
        """The computation of ``work``: local epochs on this client's data, by its executor."""
        return self.executor.train(params, self.key, version, self.epochs)

    async def work(self, params: Any, version: int) -> Update | None:
        """Trains on a served model; returns the update to send (None: nothing to send)."""
        self.ctx.log(self.name, "train_start", version=version)
        trained, charged = await self.ctx.clock.compute(
            self.device, lambda: self.train(params, version), cost=self.cost,
            examples=self.examples * self.epochs, program=(self.trainer, self.examples),
            node=self.name, label="train")
        self.stats.busy += charged
        self.ctx.log(self.name, "train_end", version=version)
        return Update(self.index, trained, self.examples, version)

    async def run(self) -> None:
        while True:
            params, version = await _wait(self.ctx, self.stats, self.inbox.receive())
            update = await self.work(params, version)
            if update is not None:
                self.to_server.send(update, tree_bytes(update.params), self.stats)

    def snapshot(self) -> tuple[dict, dict]:
        """Its key (arrays) and counters; a client keeps no model between rounds."""
        return ({"key": jax.random.key_data(self.key)},
                {"stats": self.stats.as_dict(), "crashes": self.crashes})

    def restore(self, arrays: dict, meta: dict) -> None:
        self.key = jax.random.wrap_key_data(arrays["key"])
        self.stats, self.crashes = NodeStats(**meta["stats"]), meta["crashes"]

    def rejoin(self) -> None:
        """Back after a crash or a hang: drops models served meanwhile, asks for the current one."""
        while self.inbox.pending():
            self.inbox.queue.get_nowait()
        self.ctx.log(self.name, "rejoin")
        self.to_server.send(Join(self.index), 0, self.stats)


async def supervise(ctx: Context, client: Client) -> None:
    """Runs a client so that its crash never stops the run.

    The crash is logged; a client with ``restart_after`` set comes back that many seconds later
    and asks for the current model, otherwise this returns and the client stays gone.
    """
    while True:
        try:
            await client.run()
        except Exception as err:  # a client's failure is the client's, not the run's
            client.crashes += 1
            ctx.log(client.name, "crashed", error=f"{type(err).__name__}: {err}")
            if client.restart_after is None:
                return
            await ctx.clock.sleep(client.restart_after)
            client.rejoin()


class AveragingServer:
    """Runs rounds with the clients and publishes each aggregate.

    A round serves the current model to every client that has no work outstanding, then takes
    messages until it closes: when every client served in this round has answered, or, once
    ``round_timeout`` seconds have passed, as soon as ``quorum`` valid updates are in. A client
    still working on an earlier round is neither served nor waited for; its update arrives late:
    the asynchronous methods (``accept_late``) add it to the round in progress, the synchronous
    ones drop it, and its client is served again when the next round starts. A client that
    (re)joins is served the current model at once. Every update is checked before it touches server state (it must be
    built on the version served to that client, carry a positive example count and pass
    ``aggregation.validate_update``); a bad one is logged and counted in ``rejected``.

    Args:
        wait_for_distiller: take each round's starting model from the distillation server and
            wait for it (synchronous methods); otherwise rounds run back to back.
        mix_distilled: mix models the distillation server sends between rounds into the
            current model with a staleness weight (the asynchronous forward method).
        rule: how updates are combined (``aggregation.AggregationRule``: the rule's name and
            settings, update clipping included), or a rule's name with its defaults.
        staleness_a, staleness_b: the staleness function's parameters
            (``aggregation.staleness_weight``).
        max_delta_norm: reject updates that change the model by more than this L2 norm.
        round_timeout: seconds on the run's clock after which a round may close without the
            clients that have not answered (None: wait for all of them).
        quorum: valid updates a round needs before its timeout may close it.
        accept_late: whether updates built on an earlier round's model join the current round.
        sample: the clients (indices into ``clients``) that take part in a round, given the
            round number (see ``fdjax.runtime.sampling``); every client when None. A round
            serves and waits for only the sampled clients that have no work outstanding.
        hand_over: what each published version holds: "average", the aggregate; "ensemble",
            a ``RoundModels`` of the aggregate and the accepted models it was computed from
            (the teacher of FedDF-style reverse distillation).
    """

    def __init__(self, ctx: Context, device: Device, params: Any, clients: list[Client],
                 inbox: Mailbox, cost: Cost, published: Register, wait_for_distiller: bool = False,
                 mix_distilled: bool = False, mix_alpha: float = 0.5,
                 staleness: str = "polynomial", on_round: Callable[[int], None] | None = None,
                 rule: str | aggregation.AggregationRule = "fedavg",
                 staleness_a: float = 0.5, staleness_b: float = 4.0,
                 max_delta_norm: float | None = None, round_timeout: float | None = None,
                 quorum: int = 1, accept_late: bool = False,
                 sample: Callable[[int], Sequence[int]] | None = None, executor: Any = None,
                 hand_over: str = "average"):
        self.ctx, self.device, self.params, self.clients = ctx, device, params, clients
        self.hand_over = hand_over
        #: the models of the latest aggregation (an ensemble teacher's members)
        self.members: tuple = (params,)
        self.sample = sample
        #: where its aggregations and mixes run (``fdjax.runtime.executors``)
        self.executor = executor or InProcess()
        self.cost, self.published = cost, published
        self.wait_for_distiller, self.mix_distilled = wait_for_distiller, mix_distilled
        self.mix_alpha, self.staleness = mix_alpha, staleness
        self.staleness_a, self.staleness_b = staleness_a, staleness_b
        self.rule = aggregation.AggregationRule(rule) if isinstance(rule, str) else rule
        self.max_delta_norm = max_delta_norm
        self.round_timeout, self.quorum, self.accept_late = round_timeout, quorum, accept_late
        self.inbox = inbox
        self.from_distiller = Mailbox(published.network)
        self.round = 0
        self.on_round = on_round
        self.name = "averaging"
        self.stats = NodeStats("averaging")
        #: client index -> the model version it was served and has not answered yet.
        self.serving: dict[int, int] = {}
        self.rejected: list[dict] = []
        self.late = 0
        self.timeouts = 0

    async def run(self) -> None:
        while True:
            if self.wait_for_distiller:
                self.params = await _wait(self.ctx, self.stats, self.from_distiller.receive())
            elif self.mix_distilled:
                await self._mix_pending()
            selected = (range(len(self.clients)) if self.sample is None
                        else self.sample(self.round))
            waiting = {i for i in selected if i not in self.serving}
            self.ctx.log(self.name, "round_start", round=self.round, clients=sorted(waiting))
            for index in sorted(waiting):
                self._serve(index)
            accepted = await self._collect(waiting)
            if accepted:
                models = [u.params for u in accepted]
                self.members = tuple(models)
                weights = np.asarray([u.examples for u in accepted], np.float32)
                self.params, charged = await self.ctx.clock.compute(
                    self.device, lambda: self.aggregate(models, weights),
                    cost=self.cost, examples=len(accepted),
                    program=(self.rule.name, len(accepted)), node=self.name,
                    label=self.rule.name)
                self.stats.busy += charged
            self._end_round(len(accepted))

    def _end_round(self, updates: int) -> None:
        """Counts the round, publishes the current model as its version and calls the hook
        (a checkpoint may be taken there)."""
        self.round += 1
        self.ctx.log(self.name, "round_end", round=self.round, clients=updates)
        value = self.handed_over()
        self.published.publish(value, self.round, tree_bytes(value), self.stats)
        if self.on_round is not None:
            self.on_round(self.round)

    def handed_over(self) -> Any:
        """The value a version is published as: the current model, or with ``hand_over =
        "ensemble"`` a ``RoundModels`` of it and the latest aggregation's models (after a
        restore, when those are not checkpointed, the model alone: a one-member ensemble
        until the next round)."""
        if self.hand_over == "ensemble":
            return RoundModels(self.params, self.members)
        return self.params

    def aggregate(self, models: Sequence[Any], weights: np.ndarray) -> Any:
        """The computation of a round's end: ``rule`` over the updates' models (each clipped
        to ``rule.clip_norm`` from the current model first, if set)."""
        return self.executor.call(aggregate_updates, list(models), weights, rule=self.rule,
                                  reference=self.params if self.rule.clip_norm is not None
                                  else None)

    def mix(self, distilled: Any, staleness: int) -> Any:
        """The computation of mixing a forward-distilled model in, weighted by staleness."""
        return self.executor.call(mix_stale, self.params, distilled, staleness, self.mix_alpha,
                                  kind=self.staleness, a=self.staleness_a, b=self.staleness_b)

    def counters(self) -> dict:
        """What every metrics row reports of it (a subclass may add its own)."""
        return {"rejected": len(self.rejected), "late": self.late,
                "round_timeouts": self.timeouts}

    def snapshot(self) -> tuple[dict, dict]:
        """Its state between rounds: the model (arrays) and counters.

        Outstanding requests are not part of it: a resumed run restarts every client, and its
        first round serves them all the current model.
        """
        return {"params": self.params}, {
            "round": self.round, "rejected": list(self.rejected), "late": self.late,
            "timeouts": self.timeouts, "stats": self.stats.as_dict()}

    def restore(self, arrays: dict, meta: dict) -> None:
        self.params, self.round = arrays["params"], meta["round"]
        self.members = (self.params,)
        self.rejected, self.late = list(meta["rejected"]), meta["late"]
        self.timeouts, self.stats = meta["timeouts"], NodeStats(**meta["stats"])

    def _serve(self, index: int) -> None:
        """Sends client ``index`` the current model and notes that it owes an answer."""
        self.serving[index] = self.round
        self.clients[index].inbox.send((self.params, self.round), tree_bytes(self.params),
                                       self.stats)

    async def _collect(self, waiting: set[int]) -> list[Update]:
        """Takes messages until the round may close; returns its valid updates.

        Messages that arrived at the very moment the round closes are taken too, so that a
        timeout does not split updates that arrived together.
        """
        accepted: list[Update] = []
        heard = bool(waiting)  # a round that served nobody waits for at least one message
        timer, timed_out = None, False
        if self.round_timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                self.round_timeout, self.inbox.queue.put_nowait, _Deadline(self.round))
        try:
            while not (heard and not waiting) and not (timed_out and len(accepted) >= self.quorum):
                message = await _wait(self.ctx, self.stats, self.inbox.receive())
                if isinstance(message, _Deadline):  # an earlier round's is stale
                    timed_out = timed_out or message.round == self.round
                    continue
                heard = True
                self._handle(message, waiting, accepted)
        finally:
            if timer is not None:
                timer.cancel()
        if waiting:
            self.timeouts += 1
            self.ctx.log(self.name, "round_timeout", round=self.round, missing=sorted(waiting),
                         answered=len(accepted))
        while self.inbox.pending():
            message = self.inbox.queue.get_nowait()
            if not isinstance(message, _Deadline):
                self._handle(message, set(), accepted)
        return accepted

    def _handle(self, message: Any, waiting: set[int], accepted: list[Update]) -> None:
        if self._join(message):
            waiting.add(message.client)
        elif isinstance(message, Update):
            waiting.discard(message.client)
            update = self._admit(message)
            if update is not None:
                accepted.append(update)

    def _join(self, message: Any) -> bool:
        """Serves a client that (re)joined the current model; whether ``message`` was a join."""
        if not (isinstance(message, Join) and message.client in range(len(self.clients))):
            return False
        self.ctx.log(self.name, "joined", client=message.client)
        self._serve(message.client)
        return True

    def _admit(self, update: Update) -> Update | None:
        """Checks one update; returns it if it may join this round, else logs why not."""
        served = self.serving.pop(update.client, None) if isinstance(update.client, int) else None
        reason = None
        if served is None or update.version != served:
            reason = (f"built on model version {update.version!r}, which was not served to this "
                      f"client" + (f" (it was served version {served})" if served is not None
                                   else ""))
        elif (not isinstance(update.examples, (int, np.integer)) or isinstance(update.examples, bool)
              or update.examples < 1):
            reason = f"example count must be a positive integer, got {update.examples!r}"
        else:
            reason = aggregation.validate_update(self.params, update.params,
                                                 max_delta_norm=self.max_delta_norm)
        if reason is not None:
            self.rejected.append({"time": self.ctx.clock.now(), "round": self.round,
                                  "client": update.client, "reason": reason})
            self.ctx.log(self.name, "rejected", client=update.client, reason=reason)
            return None
        if update.version < self.round and not self.accept_late:
            self.late += 1  # its client is served again when the next round starts
            self.ctx.log(self.name, "late", client=update.client, version=update.version)
            return None
        if update.version < self.round:
            self.late += 1
            self.ctx.log(self.name, "late", client=update.client, version=update.version,
                         accepted=True)
        return update

    async def _mix_pending(self) -> None:
        while self.from_distiller.pending():
            distilled, version = await self.from_distiller.receive()
            staleness = self.round - version
            self.params, charged = await self.ctx.clock.compute(
                self.device, lambda: self.mix(distilled, staleness),
                cost=self.cost, examples=1, program="mix", node=self.name, label="mix")
            self.stats.busy += charged
            self.ctx.log(self.name, "mixed", version=version, staleness=staleness)


@dataclasses.dataclass
class LeadGate:
    """Tells whether the global model is more accurate than the small one, on labeled images.

    Forward distillation teaches the small model the global model's outputs; while the global
    model is the weaker of the two that pulls the small model, the reverse distillation's
    teacher, down (measured in ``experiments/paper_cifar10``). The gate lets it run only once
    the global model leads on a labeled holdout the distillation server keeps apart from its
    distillation set.

    Args:
        global_eval, small_eval: evaluators of the two models.
        holdout: ``{"images", "labels"}``, disjoint from the distillation set and the clients.
        cost: how a check is charged, per holdout image (``examples``).
    """

    global_eval: Any
    small_eval: Any
    holdout: dict
    cost: Cost

    @property
    def examples(self) -> int:
        return int(self.holdout["images"].shape[0])

    def __call__(self, global_params: Any, small_params: Any) -> tuple[float, float]:
        return (self.global_eval(global_params, self.holdout)["accuracy"],
                self.small_eval(small_params, self.holdout)["accuracy"])


def _average(published: Any) -> Any:
    """The averaged small model of a published value."""
    return published.average if isinstance(published, RoundModels) else published


def _members(published: Any) -> tuple:
    """The client models of a published value (the average alone where it holds none)."""
    return published.members if isinstance(published, RoundModels) else (published,)


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
        member_seconds_per_example: with an ensemble teacher (``reverse.ensemble``: the
            averaging server publishes ``RoundModels``) and fixed costs, what each member
            beyond the first adds per distilled example (its forward pass); measured and
            calibrated costs time the chunk, members' forward passes included.
        gate: in "continuous" mode with ``forward``, a ``LeadGate`` checked before each
            forward distillation, which is skipped unless the global model leads; None
            forward-distils every time.
        executor: where the chunks run (default: in this process, on ``proxy``); the
            distillers themselves are still read here for their step counts and ``init``.
    """

    def __init__(self, ctx: Context, device: Device, large_state: Any, reverse: Distiller,
                 forward_distiller: Distiller | None, proxy: dict, cost: Cost, key: jax.Array,
                 averages: Register, averaging: AveragingServer, mode: str,
                 reverse_chunks: int = 1, forward_chunks: int = 1, forward_every: int = 1,
                 forward_cost: Cost | None = None, gate: LeadGate | None = None,
                 executor: Any = None, member_seconds_per_example: float = 0.0):
        self.ctx, self.device, self.state = ctx, device, large_state
        self.member_seconds_per_example = member_seconds_per_example
        #: where its chunks run (``fdjax.runtime.executors``): here, on ``proxy``, by default
        self.executor = executor or InProcess({"reverse": reverse, "forward": forward_distiller},
                                              proxy)
        self.gate = gate
        #: gate checks made and how many found the global model leading.
        self.gate_checks = 0
        self.gate_opens = 0
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
        #: the version of the newest average taken; a resumed run restarts from it.
        self.version = 0
        self.resumed = False
        self.name = "distillation"
        self.stats = NodeStats("distillation")

    @property
    def params(self) -> Any:
        return self.state.params

    def snapshot(self) -> tuple[dict, dict]:
        """Its state between computations: arrays (model, optimizer state, keys) and counters.

        Its model and counters change only when a computation has finished (the staleness of a
        chunk in progress, recorded when it starts, is left out), so a snapshot taken while one
        is in progress is the state before it; a resumed run simply redoes that computation.
        """
        arrays = {"state": self.state, "key": jax.random.key_data(self.key),
                  "forward_key": jax.random.key_data(self.forward_key)}
        return arrays, {"chunks": self.chunks, "forwards": self.forwards,
                        "gate_checks": self.gate_checks, "gate_opens": self.gate_opens,
                        "staleness": self.staleness[:self.chunks], "version": self.version,
                        "stats": self.stats.as_dict()}

    def restore(self, arrays: dict, meta: dict) -> None:
        self.state = arrays["state"]
        self.key = jax.random.wrap_key_data(arrays["key"])
        self.forward_key = jax.random.wrap_key_data(arrays["forward_key"])
        self.chunks, self.forwards = meta["chunks"], meta["forwards"]
        self.gate_checks = meta.get("gate_checks", 0)
        self.gate_opens = meta.get("gate_opens", 0)
        self.staleness, self.version = list(meta["staleness"]), meta["version"]
        self.stats = NodeStats(**meta["stats"])
        self.resumed = True

    async def _take(self, than: int) -> tuple[Any, int]:
        """Waits for an average newer than version ``than`` and takes the newest."""
        small, self.version = await _wait(self.ctx, self.stats, self.averages.wait_newer(than))
        return small, self.version

    def reverse_cost(self, members: int) -> Cost:
        """How a reverse chunk against ``members`` teacher models is charged: with fixed costs
        each member beyond the first adds its forward pass per example."""
        if members == 1 or self.cost.mode != "fixed":
            return self.cost
        return Cost("fixed", self.cost.seconds_per_example
                    + (members - 1) * self.member_seconds_per_example)

    async def _reverse(self, small: Any, version: int) -> None:
        """One chunk of reverse distillation from ``small`` (a published value: the averaged
        model, or a ``RoundModels`` whose members are the teacher)."""
        key = fold_in(self.key, self.chunks)
        newest = self.averages.version
        self.staleness.append(self.averaging.round - version)  # the chunk in progress's too
        teacher = _members(small) if self.reverse.ensemble else small
        members = len(teacher) if self.reverse.ensemble else 1
        (self.state, _), charged = await self.ctx.clock.compute(
            self.device, lambda: self.executor.chunk("reverse", self.state, teacher, key),
            cost=self.reverse_cost(members),
            examples=self.reverse.steps * self.reverse.batch_size,
            program=(self.reverse, members) if self.reverse.ensemble else self.reverse,
            node=self.name, label="reverse")
        self.stats.busy += charged
        self.chunks += 1
        extra = {"members": members} if self.reverse.ensemble else {}
        self.ctx.log(self.name, "reverse", version=version, staleness=self.staleness[-1],
                     newest=newest, **extra)

    async def _forward(self, small: Any, version: int) -> Any:
        distiller = self.forward_distiller
        state = distiller.init(_average(small))
        number = self.forwards + 1
        for i in range(self.forward_chunks):
            key = fold_in(fold_in(self.forward_key, number), i)
            (state, _), charged = await self.ctx.clock.compute(
                self.device, lambda: self.executor.chunk("forward", state, self.params, key),
                cost=self.forward_cost, examples=distiller.steps * distiller.batch_size,
                program=distiller, node=self.name, label="forward")
            self.stats.busy += charged
        self.forwards = number
        self.ctx.log(self.name, "forward", version=version)
        return state.params

    async def _leads(self, small: Any, version: int) -> bool:
        """Whether the global model is more accurate than ``small``'s average (a published
        value) on the gate's holdout."""
        gate, small = self.gate, _average(small)
        (global_accuracy, small_accuracy), charged = await self.ctx.clock.compute(
            self.device, lambda: gate(self.params, small), cost=gate.cost,
            # keyed by its compiled programs and holdout size, like every other program, so a
            # measured or calibrated cost compiles and calibrates it once per process
            examples=gate.examples, program=("gate", gate.global_eval, gate.small_eval,
                                             gate.examples), node=self.name, label="gate")
        self.stats.busy += charged
        leads = global_accuracy > small_accuracy
        self.gate_checks += 1
        self.gate_opens += int(leads)
        self.ctx.log(self.name, "gate", version=version, leads=leads,
                     global_accuracy=global_accuracy, small_accuracy=small_accuracy)
        return leads

    async def run(self, initial_small: Any) -> None:
        if self.mode == "sync":
            small, version = initial_small, 0
            if self.resumed:  # checkpointed just after an average was published: distil it
                small, version = await self._take(self.version)
                for _ in range(self.reverse_chunks):
                    await self._reverse(small, version)
            while True:
                if self.forward_distiller is not None:
                    small = await self._forward(small, version)
                small = _average(small)
                self.averaging.from_distiller.send(small, tree_bytes(small), self.stats)
                small, version = await self._take(version)
                for _ in range(self.reverse_chunks):
                    await self._reverse(small, version)
        elif self.mode == "round":
            version = self.version
            while True:
                small, version = await self._take(version)
                for _ in range(self.reverse_chunks):
                    await self._reverse(small, version)
        else:  # continuous
            small, version = await self._take(self.version)
            while True:
                if self.averages.version > version:
                    small, version = self.averages.value, self.averages.version
                    self.version = version
                await self._reverse(small, version)
                if (self.forward_distiller is not None and self.chunks % self.forward_every == 0
                        and (self.gate is None or await self._leads(small, version))):
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
                 small_eval: Evaluator | None, test: dict, on_row: Callable[[dict], None],
                 first_delay: float = 0.0, wall_offset: float = 0.0):
        self.ctx, self.interval = ctx, interval
        self.global_model, self.small_model = global_model, small_model
        self.global_eval, self.small_eval, self.test = global_eval, small_eval, test
        self.on_row = on_row
        #: a resumed run's observer first waits for the next evaluation the killed run owed,
        #: and counts wall time on from where the killed run's rows stopped.
        self.first_delay = first_delay
        self.wall_start = time.perf_counter() - wall_offset

    def evaluate(self) -> dict:
        row = {"time": self.ctx.clock.now(), "wall_time": time.perf_counter() - self.wall_start}
        timed = self.ctx.clock.timed
        row["global_accuracy"] = timed(
            lambda: self.global_eval(self.global_model(), self.test))[0]["accuracy"]
        row["small_accuracy"] = (timed(lambda: self.small_eval(self.small_model(), self.test))[0]
                                 ["accuracy"] if self.small_model is not None else None)
        return row

    async def run(self) -> None:
        if self.first_delay > 0:
            await self.ctx.clock.sleep(self.first_delay)
        while True:
            if self.ctx.clock.virtual:
                row = self.evaluate()
            else:
                row = await asyncio.to_thread(self.evaluate)
            self.on_row(row)
            await self.ctx.clock.sleep(self.interval)
