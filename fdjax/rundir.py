"""A run directory: the resolved config, the metrics log, checkpoints and the final outputs.

The metrics log is append-only, one JSON line per evaluation, and counts the bytes and lines it
has written, so a checkpoint can record exactly how much of it the checkpointed state had produced.
Resuming truncates the log back to that length: every line written before the checkpoint is kept,
none written after it survives to be written again, and a line torn by the kill is cut off.

Files that are replaced whole (``config.toml``, ``nodes.json``) are written to a temporary file
and renamed into place, so they are either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fdjax.checkpoint import RunCheckpoints

#: Outputs of a finished run; a fresh run removes stale ones first, and ``nodes.json`` (written
#: last) marks a run as finished.
FINAL_OUTPUTS = ("nodes.json", "global_params.npz", "small_params.npz")


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDirectory:
    """The files of one run.

    Args:
        path: the directory.
        keep: how many checkpoints to keep.
    """

    def __init__(self, path: str | Path, keep: int = 2):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = RunCheckpoints(self.path / "checkpoints", keep)
        self.metrics_bytes = 0
        self.metrics_rows = 0

    @property
    def finished(self) -> bool:
        return (self.path / "nodes.json").exists()

    def start_fresh(self, config_text: str) -> None:
        """Clears a previous run's outputs and checkpoints, writes the config, empties the log.

        Raises:
            ValueError: if the directory cannot be written, naming it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in FINAL_OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
            self.metrics.write_bytes(b"")
            write_atomic(self.path / "config.toml", config_text)
        except OSError as err:
            raise ValueError(f"cannot write to output directory {str(self.path)!r}: "
                             f"{err.strerror or err}") from err

    def append(self, row: dict) -> None:
        """Appends one metrics line and counts it."""
        line = (json.dumps(row) + "\n").encode()
        with open(self.metrics, "ab") as f:
            f.write(line)
        self.metrics_bytes += len(line)
        self.metrics_rows += 1

    def sync(self) -> None:
        """Flushes the metrics log to disk before a checkpoint says how long it is."""
        with open(self.metrics, "ab") as f:
            os.fsync(f.fileno())

    def check_covers(self, nbytes: int, rows: int) -> str | None:
        """Why the log cannot be cut back to ``nbytes`` holding ``rows`` lines, or None."""
        try:
            with open(self.metrics, "rb") as f:
                head = f.read(nbytes)
        except OSError as err:
            return f"metrics.jsonl cannot be read: {err.strerror or err}"
        if len(head) < nbytes:
            return f"metrics.jsonl holds {len(head)} bytes, fewer than the {nbytes} it recorded"
        if head.count(b"\n") != rows or (nbytes and not head.endswith(b"\n")):
            return f"metrics.jsonl's first {nbytes} bytes are not the {rows} lines it recorded"
        return None

    def truncate(self, nbytes: int, rows: int) -> list[dict]:
        """Cuts the log back to its first ``nbytes`` (``rows`` lines) and returns those rows."""
        with open(self.metrics, "r+b") as f:
            f.truncate(nbytes)
            f.seek(0)
            kept = f.read()
        self.metrics_bytes, self.metrics_rows = nbytes, rows
        return [json.loads(line) for line in kept.decode().splitlines()]

    def write_nodes(self, summary: dict) -> None:
        write_atomic(self.path / "nodes.json", json.dumps(summary, indent=1))
