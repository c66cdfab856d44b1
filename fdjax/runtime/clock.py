"""Two clocks for one node code: virtual time and the wall clock.

**Virtual clock.** ``VirtualTimeLoop`` is an asyncio event loop whose ``time()`` is virtual: when no
callback is ready it jumps straight to the earliest timer, so ``await asyncio.sleep(cost)`` takes no
wall time and events happen in virtual-time order. Compute therefore runs on the loop's own thread
(blocking); the node then sleeps its cost in virtual time while it holds its device. Handing compute
to a thread would let the clock jump past it.

**Real clock.** The standard event loop; compute goes to a worker thread
(``asyncio.to_thread``) so nodes overlap for real, and costs are whatever the wall clock says.
The first call of each program compiles it there too, inside a node's own time; the clock
times those calls apart (``Clock.compile_seconds``) so that a reader of the round times can
tell how much of the first rounds was compilation.

``Device`` models a machine: a speed (compute costs are divided by it) and a number of slots (how
many computations it runs at once; nodes on a one-slot device never overlap). ``Clock.compute``
runs a function on a device and charges its cost: measured (each call's wall time), calibrated
(each program's fastest of a few timed calls, then that figure for every call) or fixed (per
example). ``Clock.compute_shared`` runs one call for several nodes on one device (a cohort of
clients) and charges each node its share.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: idle waits jump to the next timer instantly.

    Relies on CPython's ``BaseEventLoop`` internals (``_ready``, ``_scheduled``), stable since 3.4.
    Real I/O and threads must not be mixed in: nothing here waits for them.
    """

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._virtual_now = start

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        if not self._ready and self._scheduled:
            head = self._scheduled[0]
            if not head._cancelled and head._when > self._virtual_now:
                self._virtual_now = head._when
        super()._run_once()


@dataclasses.dataclass
class Device:
    """A named machine with a speed (1.0 = the machine fdjax runs on) and compute slots."""

    name: str
    speed: float = 1.0
    slots: int = 1

    def __post_init__(self):
        if not self.speed > 0 or self.slots < 1:
            raise ValueError(f"device {self.name!r} needs speed > 0 and slots >= 1")
        self._semaphore: asyncio.Semaphore | None = None
        #: (start, end, node) of every computation, on the run's clock.
        self.intervals: list[tuple[float, float, str]] = []

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # created inside the running loop
            self._semaphore = asyncio.Semaphore(self.slots)
        return self._semaphore


@dataclasses.dataclass
class Cost:
    """How compute is charged: measured wall time, or a fixed time per example."""

    mode: str = "measured"  # "measured", "calibrated" or "fixed"
    seconds_per_example: float = 0.0

    def __post_init__(self):
        if self.mode not in COST_MODES:
            raise ValueError(f"unknown cost mode {self.mode!r}; choose one of {list(COST_MODES)}")


COST_MODES = ("measured", "calibrated", "fixed")
#: Timed calls whose fastest is a program's calibrated cost. Other load on the machine only ever
#: adds time, so the minimum is the figure closest to the program's own cost.
CALIBRATION_CALLS = 2


#: Programs (compiled objects and their input sizes) whose first call has run in this process;
#: jit caches live as long as the programs, so a later run need not compile them again.
_COMPILED: set[Any] = set()
#: Calibrated wall seconds per call of each program, shared by every run of the process, so all
#: methods of a comparison are charged the same for the same work.
_CALIBRATED: dict[Any, float] = {}
#: The ``program`` of the real-clock compute call the current task is making, for ``run_real``
#: (a context variable: each node's task has its own, and the Ray clock's override ignores it).
_PROGRAM: contextvars.ContextVar[Any] = contextvars.ContextVar("fdjax_program", default=None)


class Clock:
    """Runs compute on devices and charges it, on virtual or real time.

    Args:
        virtual: virtual time (deterministic with fixed costs) or the wall clock.
    """

    def __init__(self, virtual: bool):
        self.virtual = virtual
        self.loop: asyncio.AbstractEventLoop | None = None
        self.origin = 0.0
        #: Wall seconds spent in compiled compute (charged or not), and in the calls that
        #: compiled a program: on the virtual clock the extra first call of each new program
        #: (and calibration calls), never charged; on the real clock each new program's first
        #: call itself, whose seconds pass on the wall clock inside its node's compute, so this
        #: says how much of that time was compilation (plus one execution). Either way a call
        #: counts in one of the two, and the simulation-overhead benchmark divides by them.
        self.compute_seconds = 0.0
        self.compile_seconds = 0.0
        #: "node label" -> calibrated seconds per call, for the run's record.
        self.calibrated: dict[str, float] = {}

    def new_loop(self, start: float = 0.0) -> asyncio.AbstractEventLoop:
        """The event loop a run executes on; ``now()`` starts at ``start`` (a resumed run goes
        on from its checkpoint's time)."""
        self.loop = VirtualTimeLoop(start) if self.virtual else asyncio.new_event_loop()
        self.origin = self.loop.time() - start
        return self.loop

    def now(self) -> float:
        """Seconds on the run's clock (callable from worker threads too)."""
        return self.loop.time() - self.origin

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def compute(self, device: Device, fn: Callable[[], Any], *, cost: Cost,
                      examples: int = 0, program: Any = None, node: str = "",
                      label: str = "") -> tuple[Any, float]:
        """Runs ``fn()`` on ``device``; returns its result and the time it was charged.

        In virtual mode the call runs now, blocking, and the node then holds the device for the
        charged time. With a measured or calibrated cost the first call of each ``program`` is
        run twice and the second timed, so compilation is never charged (once per process:
        compiled programs are shared by every run). A calibrated cost times the first
        ``CALIBRATION_CALLS`` calls of a program and charges their minimum for every call of it;
        ``fn`` must be pure (the nodes' programs are) since it runs more than once. ``label``
        names the computation in the calibration record. On the real clock ``fn`` runs once, in
        a worker thread, and a new ``program``'s first call counts as compilation.
        """
        result, (charged,) = await self.compute_shared(
            device, fn, cost=cost, examples=[examples], program=program, nodes=[node],
            label=label)
        return result, charged

    async def compute_shared(self, device: Device, fn: Callable[[], Any], *, cost: Cost,
                             examples: Sequence[int], nodes: Sequence[str], program: Any = None,
                             label: str = "", on_start: Callable[[int], None] | None = None,
                             on_end: Callable[[int, Any], None] | None = None
                             ) -> tuple[Any, list[float]]:
        """Runs ``fn()`` once for several nodes sharing ``device``; charges each node its share.

        A cohort of clients on one device is one call. The call is charged as ``compute`` would
        charge it for all their examples, and that time is split among ``nodes`` in proportion
        to their ``examples``; with a fixed cost each node is charged exactly what it would be
        alone (``seconds_per_example * examples / speed``). The device is held for the shares one
        after another, in the order given, so its intervals and each node's busy time read as if
        the nodes had run one at a time: ``on_start(i)`` and ``on_end(i, result)`` are called as
        node ``i``'s share starts and ends. On the real clock every share ends when the call
        does, and the first call of a new ``program`` counts in ``compile_seconds``.

        Returns:
            ``fn()``'s result and the seconds charged to each node.
        """
        on_start = on_start or (lambda i: None)
        on_end = on_end or (lambda i, result: None)
        async with device.semaphore:
            start = self.now()
            if not self.virtual:
                for i in range(len(nodes)):
                    on_start(i)
                token = _PROGRAM.set(program)
                try:
                    result = await self.run_real(fn)
                finally:
                    _PROGRAM.reset(token)
                shares = _split(self.now() - start, examples)
                for i, share in enumerate(shares):
                    device.intervals.append((start, start + share, nodes[i]))
                    start += share
                    on_end(i, result)
                return result, shares
            if cost.mode == "fixed":
                result, _ = self.timed(fn)
                shares = [cost.seconds_per_example * n / device.speed for n in examples]
            else:
                name = nodes[0] if len(nodes) == 1 else device.name
                result, wall = self._charge(fn, cost, program, f"{name} {label}".strip())
                shares = _split(wall / device.speed, examples)
            for i, share in enumerate(shares):
                on_start(i)
                begin = self.now()
                await self.sleep(share)
                device.intervals.append((begin, self.now(), nodes[i]))
                on_end(i, result)
            return result, shares

    async def run_real(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn()`` on the real clock without blocking the event loop: in a worker thread.

        The first call of a program new to the process (``_PROGRAM``, set by
        ``compute_shared``) compiles it, so its seconds go to ``compile_seconds``, not
        ``compute_seconds``; the program is claimed on the loop's thread before the call, so
        of several nodes starting one new program at once only the first counts. The Ray
        backend's clock overrides this to await the actor call ``fn`` submits instead: its
        actors compile while they are placed, before the clock starts.
        """
        program = _PROGRAM.get()
        first = program is not None and program not in _COMPILED
        if first:
            _COMPILED.add(program)
        result, _ = await asyncio.to_thread(self.timed, fn, first)
        return result

    def _charge(self, fn: Callable[[], Any], cost: Cost, program: Any, name: str
                ) -> tuple[Any, float]:
        """Runs ``fn()`` and returns its result and the wall seconds a measured or calibrated
        cost charges for it (compiling first where ``program`` is new)."""
        if program is not None and program not in _COMPILED:
            # compile; pure functions give the same result again
            self.timed(fn, compiling=True)
            _COMPILED.add(program)
        calibrated = cost.mode == "calibrated" and program is not None
        calibrate = calibrated and program not in _CALIBRATED
        extra = [self.timed(fn, compiling=True)[1]
                 for _ in range(CALIBRATION_CALLS - 1)] if calibrate else []
        result, wall = self.timed(fn)
        if calibrate:
            _CALIBRATED[program] = min(extra + [wall])
        if calibrated:
            wall = _CALIBRATED[program]
            self.calibrated[name] = wall
        return result, wall

    def timed(self, fn: Callable[[], Any], compiling: bool = False) -> tuple[Any, float]:
        """Runs ``fn()`` to completion; returns its result and wall seconds.

        The seconds are added to ``compute_seconds``, or with ``compiling`` to
        ``compile_seconds``: a call made only to compile or calibrate (virtual clock), or a new
        program's first call (real clock).
        """
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        elapsed = time.perf_counter() - start
        if compiling:
            self.compile_seconds += elapsed
        else:
            self.compute_seconds += elapsed
        return result, elapsed


def _split(seconds: float, examples: Sequence[int]) -> list[float]:
    """``seconds`` shared in proportion to ``examples`` (equally if there are none)."""
    if len(examples) == 1:
        return [seconds]
    total = sum(examples)
    if total <= 0:
        return [seconds / len(examples)] * len(examples)
    return [seconds * n / total for n in examples]
