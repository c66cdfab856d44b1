"""Crash-safe checkpoints of a whole run, written with orbax.

A checkpoint is one orbax step directory (the step is the averaging round it was taken after)
holding two items: ``state``, every array of the run (the servers' models, the distillation
server's optimizer state, RNG keys), and ``meta``, JSON (versions, counters, the clock's time, how
much of ``metrics.jsonl`` it covers) with a SHA-256 checksum of both.

Orbax writes a step into a temporary directory and renames it into place, so a process killed
mid-save leaves every earlier checkpoint intact plus an incomplete temporary directory, which
``restore`` reports and ignores. ``restore`` takes the newest checkpoint whose files read back, whose
checksum matches and which the caller accepts, and reports every one it skipped and why. Saves are
synchronous: when ``save`` returns the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_TMP = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """No usable checkpoint; the one-line message says where and why."""


class Restored(NamedTuple):
    """A checkpoint read back: its step, arrays and meta, and what was skipped to get it."""

    step: int
    arrays: Any
    meta: dict
    problems: list[str]


def checksum(arrays: Any, meta: dict) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, and the meta as sorted JSON."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


class RunCheckpoints:
    """The checkpoints of one run directory.

    Args:
        directory: where the step directories live (``<run>/checkpoints``).
        keep: how many to keep (>= 2, so a corrupted newest one has a predecessor).
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()  # orbax wants absolute paths
        self.keep = keep
        self._manager = None
        #: wall seconds spent in each save, for the overhead figures.
        self.save_seconds: list[float] = []

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp  # heavy; only runs that checkpoint pay for it

            self._manager = ocp.CheckpointManager(self.directory, options=(
                ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                             enable_async_checkpointing=False, create=True)))
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps()) if self.directory.is_dir() else []

    def require_any(self) -> None:
        """Raises ``CheckpointError`` at once when there is not even one step directory, before
        a resumed run builds anything."""
        if not self.directory.is_dir() or not any(
                p.name.isdigit() for p in self.directory.iterdir()):
            found = self.incomplete()
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r} to resume from"
                                  + (f" (only incomplete ones: {', '.join(found)})"
                                     if found else ""))

    def incomplete(self) -> list[str]:
        """Temporary directories of saves that were interrupted."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if _TMP in p.name)

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        """Writes checkpoint ``step`` atomically; older ones beyond ``keep`` are deleted."""
        import orbax.checkpoint as ocp

        start = time.perf_counter()
        meta = {**meta, "checksum": checksum(arrays, meta)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        self.save_seconds.append(time.perf_counter() - start)

    def restore(self, target: Any, accept: Callable[[dict], str | None] | None = None
                ) -> Restored:
        """The newest usable checkpoint, read into arrays shaped like ``target``.

        A checkpoint is skipped, with the reason in ``problems``, when its files cannot be read,
        its checksum does not match, or ``accept(meta)`` returns a reason. Skipped newer ones are
        moved aside (to ``unusable-<step>``) so that the resumed run's checkpoints go on from the
        one used.

        Raises:
            CheckpointError: when none is usable, naming the directory and each problem.
        """
        import orbax.checkpoint as ocp

        problems = [f"incomplete checkpoint {name} (a save was interrupted) ignored"
                    for name in self.incomplete()]
        skipped = []
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                arrays, meta = restored["state"], dict(restored["meta"])
            except Exception as err:  # any damage to the files surfaces here
                problems.append(f"checkpoint {step} is unreadable ({_first_line(err)})")
                skipped.append(step)
                continue
            if meta.pop("checksum", None) != checksum(arrays, meta):
                problems.append(f"checkpoint {step} is corrupted (checksum mismatch)")
            elif accept is not None and (why := accept(meta)) is not None:
                problems.append(f"checkpoint {step}: {why}")
            else:
                self._set_aside(skipped)
                # Orbax returns arrays committed to a device; freshly made (uncommitted) ones
                # like the run's own hit the compiled programs' caches instead of recompiling.
                arrays = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), arrays)
                return Restored(step, arrays, meta, problems)
            skipped.append(step)
        where = str(self.directory)
        if not problems:
            raise CheckpointError(f"no checkpoint in {where!r} to resume from")
        raise CheckpointError(f"no usable checkpoint in {where!r}: " + "; ".join(problems))

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        self.close()
        for step in steps:
            shutil.move(str(self.directory / str(step)),
                        str(self.directory / f"unusable-{step}-{time.time_ns()}"))
