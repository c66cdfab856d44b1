"""What a checkpoint of a run holds, when one is taken, and how a killed run is put back together.

**One checkpoint of the whole run, at a quiescent point.** Both servers are checkpointed together,
from the averaging server's end-of-round hook, right after it has published a round: its model
and counters are final for that round, and every other node's state is read at the same instant
of the run's clock (in virtual mode the whole run is one thread; in real mode node state is only
assigned on the event loop's thread). A node's counters and model change only when a computation
has finished, so a node in the middle of one is saved as it was before it, and the resumed run
redoes it. That is what separate per-node checkpoints would give too, minus the work to make them
agree: what is lost is the work in flight (client training in progress, a distillation chunk,
models on the wire), which a real kill loses anyway. A resumed run restarts every client and
serves them the published model, and hands the distillation server that model as the newest.

**The metrics log.** A checkpoint records how many bytes and lines of ``metrics.jsonl`` its state
had produced (flushed to disk first); resuming cuts the log back to exactly that, so every line
written before the checkpoint is kept once and no line is torn. The observer then evaluates next
at the time the killed run owed its next row, and counts wall time on from the last row's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

from fdjax.config import Config, config_to_toml
from fdjax.runtime.channels import Register
from fdjax.runtime.clock import Clock
from fdjax.runtime.nodes import AveragingServer, Client, DistillationServer, Observer
from fdjax.rundir import RunDirectory

FORMAT = 1
_logger = logging.getLogger("fdjax")


@dataclasses.dataclass
class Start:
    """Where a run starts: its clock's time, the wall seconds its rows had counted, and how long
    the observer waits before its first evaluation."""

    time: float = 0.0
    wall: float = 0.0
    first_delay: float = 0.0


class RunState:
    """The nodes of one run seen as state to checkpoint and restore."""

    def __init__(self, config: Config, clock: Clock, averaging: AveragingServer,
                 distiller: DistillationServer | None, clients: list[Client], rows: list[dict],
                 rundir: RunDirectory | None):
        self.config, self.clock, self.averaging = config, clock, averaging
        self.distiller, self.clients, self.rows, self.rundir = distiller, clients, rows, rundir
        self.config_hash = hashlib.sha256(config_to_toml(config).encode()).hexdigest()
        self.observer: Observer | None = None
        #: one entry per time this run was resumed (kept across resumes in the checkpoints).
        self.resumes: list[dict] = []
        self.last_round = 0
        self.last_wall = time.perf_counter()

    def fault_counters(self) -> dict:
        """The counters every metrics row carries."""
        return {**self.averaging.counters(),
                "client_crashes": sum(c.crashes for c in self.clients)}

    def _nodes(self) -> tuple[dict, dict]:
        """Every node's arrays and counters."""
        averaging = self.averaging.snapshot()
        distiller = self.distiller.snapshot() if self.distiller else ({}, None)
        clients = {c.name: c.snapshot() for c in self.clients}
        arrays = {"averaging": averaging[0], "distiller": distiller[0],
                  "clients": {name: arr for name, (arr, _) in clients.items()}}
        meta = {"averaging": averaging[1], "distiller": distiller[1],
                "clients": {name: m for name, (_, m) in clients.items()}}
        return arrays, meta

    def snapshot(self) -> tuple[dict, dict]:
        """Every array of the run, and everything else as JSON."""
        arrays, nodes = self._nodes()
        wall = time.perf_counter() - self.observer.wall_start if self.observer else 0.0
        meta = {"format": FORMAT, "config": self.config_hash, "round": self.averaging.round,
                "time": self.clock.now(), "wall": wall,
                "metrics": {"bytes": self.rundir.metrics_bytes if self.rundir else 0,
                            "rows": self.rundir.metrics_rows if self.rundir else 0,
                            "last_time": self.rows[-1]["time"] if self.rows else None},
                **nodes, "resumes": self.resumes}
        return arrays, meta

    def fresh_start(self) -> Start:
        return Start()

    def round_done(self, r: int) -> None:
        """Takes a checkpoint when one is due (``config.checkpoint``)."""
        c = self.config.checkpoint
        if self.rundir is None or (c.every_rounds is None and c.every_seconds is None):
            return
        if ((c.every_rounds is not None and r - self.last_round >= c.every_rounds)
                or (c.every_seconds is not None
                    and time.perf_counter() - self.last_wall >= c.every_seconds)):
            self.save()

    def save(self) -> None:
        self.rundir.sync()
        arrays, meta = self.snapshot()
        self.rundir.checkpoints.save(self.averaging.round, arrays, meta)
        self.last_round, self.last_wall = self.averaging.round, time.perf_counter()

    def resume(self, published: Register) -> Start:
        """Restores every node from the newest usable checkpoint and cuts the metrics log back.

        Raises:
            fdjax.checkpoint.CheckpointError: when no checkpoint is usable.
        """
        target, _ = self._nodes()

        def accept(meta: dict) -> str | None:
            if meta.get("format") != FORMAT:
                return f"written by another checkpoint format ({meta.get('format')})"
            if meta.get("config") != self.config_hash:
                return "taken under a different config.toml"
            return self.rundir.check_covers(meta["metrics"]["bytes"], meta["metrics"]["rows"])

        restored = self.rundir.checkpoints.restore(target, accept)
        arrays, meta = restored.arrays, restored.meta
        for problem in restored.problems:
            _logger.warning("resume: %s", problem)
        self.averaging.restore(arrays["averaging"], meta["averaging"])
        published.restore(self.averaging.handed_over(), self.averaging.round)
        if self.distiller is not None:
            self.distiller.restore(arrays["distiller"], meta["distiller"])
        for c in self.clients:
            c.restore(arrays["clients"][c.name], meta["clients"][c.name])
        self.rows[:] = self.rundir.truncate(meta["metrics"]["bytes"], meta["metrics"]["rows"])
        self.resumes = list(meta["resumes"]) + [{
            "checkpoint": restored.step, "round": meta["round"], "time": meta["time"],
            "rows_kept": meta["metrics"]["rows"], "problems": restored.problems}]
        self.last_round = meta["round"]
        last = meta["metrics"]["last_time"]
        interval = self.config.stop.eval_interval
        first_delay = 0.0 if last is None else max(0.0, last + interval - meta["time"])
        return Start(meta["time"], meta["wall"], first_delay)
