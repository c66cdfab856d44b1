"""Clients that share a device, trained together as cohorts.

When several clients live on one device (``clients.devices``), a ``ClientCohort`` trains the
clients a round selects on that device in one ``CohortTrainer.train`` call instead of one after
another. Each member stays a ``Client`` (index, examples, key, name, stats): the averaging server
sends to members as to any client, and only their inboxes lead to the cohort.

Accounting. The cohort call runs through ``Clock.compute_shared``: its cost (measured, calibrated
or fixed) is split among the members in proportion to their examples, each member's busy time is
its share, its update leaves when its share ends, and the device's intervals list the members one
after another, as if they had trained one at a time. With a fixed cost every member is charged
exactly what it would be charged training alone, so a run's schedule is the same with cohorts on
or off; with a measured cost the device is charged what the cohort really took. (A calibrated
cost charges cohorts as measured: which clients a cohort holds changes from round to round.)
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import jax

from fdjax.runtime.channels import NodeStats, tree_bytes
from fdjax.runtime.clock import Cost, Device
from fdjax.runtime.compiled import ClientPool, CohortTrainer
from fdjax.runtime.nodes import Client, Context, Update


class _MemberInbox:
    """A member's inbox: messages to the member are delivered to its cohort, tagged with it."""

    def __init__(self, cohort: "ClientCohort", member: Client):
        self.cohort, self.member = cohort, member

    def send(self, message: Any, nbytes: int, sender: NodeStats) -> None:
        params, version = message
        # Counted at send time: a broadcast's messages are all sent before any can arrive, so
        # the cohort knows how many of a version to wait for, on either clock.
        self.cohort.expected[version] += 1
        self.cohort.network.deliver(nbytes, sender, self.cohort.arrive, self.member, params,
                                    version)


class ClientCohort:
    """Trains the selected clients of one shared device together, round after round.

    Args:
        ctx: the run's context.
        device: the device the members share.
        members: the clients on the device; ``pool`` row ``i`` holds ``members[i]``'s examples.
        trainer: the compiled cohort program.
        pool: the members' examples on the device.
        epochs: local epochs per round.
        cost: how the device's compute is charged.
    """

    def __init__(self, ctx: Context, device: Device, members: list[Client],
                 trainer: CohortTrainer, pool: ClientPool, epochs: int, cost: Cost):
        self.ctx, self.device, self.members = ctx, device, members
        self.trainer, self.pool, self.epochs, self.cost = trainer, pool, epochs, cost
        self.name = device.name
        self.network = members[0].to_server.network
        self._keys: jax.Array | None = None  # read from the members when training starts
        self.row = {m.index: i for i, m in enumerate(members)}
        self.expected: collections.Counter[int] = collections.Counter()
        self.arrived: dict[int, list[tuple[Client, Any]]] = collections.defaultdict(list)
        self._event: asyncio.Event | None = None
        #: when each member last finished training (it has waited since); None while training
        self.waiting_since: dict[int, float | None] = {m.index: None for m in members}
        for member in members:
            member.inbox = _MemberInbox(self, member)

    @property
    def event(self) -> asyncio.Event:
        if self._event is None:  # created inside the running loop
            self._event = asyncio.Event()
        return self._event

    def arrive(self, member: Client, params: Any, version: int) -> None:
        self.arrived[version].append((member, params))
        self.event.set()

    async def _next_version(self) -> int:
        """The oldest version all of whose messages have arrived."""
        while True:
            for version in sorted(self.arrived):
                if len(self.arrived[version]) == self.expected[version]:
                    return version
            self.event.clear()
            await self.event.wait()

    @property
    def keys(self) -> jax.Array:
        """The members' keys, stacked; read once training starts, after a resume restored them."""
        if self._keys is None:
            self._keys = jax.numpy.stack([m.key for m in self.members])
        return self._keys

    async def run(self) -> None:
        start = self.ctx.clock.now()  # a resumed run starts at its checkpoint's time
        for member in self.members:
            self.waiting_since[member.index] = start
        try:
            while True:
                await self._train(await self._next_version())
        finally:  # the run stopped: members waiting for the server were idle until now
            now = self.ctx.clock.now()
            for member in self.members:
                since = self.waiting_since[member.index]
                if since is not None:
                    member.stats.idle += now - since

    async def _train(self, version: int) -> None:
        arrivals = sorted(self.arrived.pop(version), key=lambda a: a[0].index)
        del self.expected[version]
        members = [member for member, _ in arrivals]
        params = arrivals[0][1]  # one broadcast: every member was sent the same model
        rows = [self.row[m.index] for m in members]
        clock = self.ctx.clock
        for member in members:
            member.stats.idle += clock.now() - self.waiting_since[member.index]
            self.waiting_since[member.index] = None
        if clock.virtual:  # compile new cohort shapes outside the timed call: never charged
            clock.timed(lambda: self.trainer.warm(params, self.pool, rows), compiling=True)

        def on_start(i: int) -> None:
            self.ctx.log(members[i].name, "train_start", version=version)

        def on_end(i: int, trained: list[Any]) -> None:
            member = members[i]
            self.ctx.log(member.name, "train_end", version=version)
            self.waiting_since[member.index] = clock.now()
            member.to_server.send(Update(member.index, trained[i], member.examples, version),
                                  tree_bytes(trained[i]), member.stats)

        _, shares = await clock.compute_shared(
            self.device,
            lambda: self.trainer.train(params, self.pool, rows, self.keys, version=version,
                                       epochs=self.epochs)[0],
            cost=self.cost, examples=[m.examples * self.epochs for m in members],
            nodes=[m.name for m in members], label="train", on_start=on_start, on_end=on_end)
        for member, share in zip(members, shares):
            member.stats.busy += share
