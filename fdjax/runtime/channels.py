"""Channels between nodes: a mailbox, and a newest-value register.

A message costs ``latency + bytes / bandwidth`` seconds on the run's clock: it is delivered that
long after it was sent, and the sender does not wait for it (uploads overlap computation). Senders
account messages and bytes on their own ``NodeStats``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays in a pytree (what a model costs to send)."""
    return sum(np.dtype(x.dtype).itemsize * math.prod(x.shape)
               for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape"))


@dataclasses.dataclass
class Network:
    """Message cost model: ``latency + bytes / bandwidth`` seconds."""

    latency: float = 0.01
    bandwidth: float = 1e8

    def delay(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth

    def deliver(self, nbytes: int, sender: "NodeStats", arrive: Callable[..., None],
                *args: Any) -> None:
        """Books one message of ``nbytes`` on ``sender`` and calls ``arrive(*args)`` after the
        network delay; the sender does not wait."""
        sender.messages += 1
        sender.bytes += nbytes
        asyncio.get_running_loop().call_later(self.delay(nbytes), arrive, *args)


@dataclasses.dataclass
class NodeStats:
    """What a node did: busy and idle seconds, messages and bytes sent."""

    role: str
    busy: float = 0.0
    idle: float = 0.0
    messages: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Mailbox:
    """A node's inbox; ``send`` delivers after the network delay without blocking the sender."""

    def __init__(self, network: Network):
        self.network = network
        self._queue: asyncio.Queue | None = None

    @property
    def queue(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def send(self, message: Any, nbytes: int, sender: NodeStats) -> None:
        self.network.deliver(nbytes, sender, self.queue.put_nowait, message)

    async def receive(self) -> Any:
        return await self.queue.get()

    def pending(self) -> int:
        return self.queue.qsize()


class Register:
    """Holds the newest published value with a version; readers wait for a newer one.

    Used for "the latest average": the distillation server always takes the newest model it has
    received and never a queue of old ones.
    """

    def __init__(self, network: Network):
        self.network = network
        self.version = 0
        self.value: Any = None
        self._changed: asyncio.Event | None = None

    @property
    def changed(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def publish(self, value: Any, version: int, nbytes: int, sender: NodeStats) -> None:
        self.network.deliver(nbytes, sender, self._arrive, value, version)

    def restore(self, value: Any, version: int) -> None:
        """Holds ``value`` at ``version`` at once: a resumed run's last published value."""
        self.version, self.value = version, value

    def _arrive(self, value: Any, version: int) -> None:
        if version > self.version:  # a late, older message never replaces a newer one
            self.version, self.value = version, value
            self.changed.set()

    async def wait_newer(self, than: int) -> tuple[Any, int]:
        """The newest value once its version exceeds ``than``."""
        while self.version <= than:
            self.changed.clear()
            await self.changed.wait()
        return self.value, self.version
