"""A run directory: the resolved config, the metrics log, checkpoints and the final outputs.

The metrics log is append-only, one JSON line per evaluation, and counts the bytes and lines it
has written, so a checkpoint can record exactly how much of it the checkpointed state had produced.
Resuming truncates the log back to that length: every line written before the checkpoint is kept,
none written after it survives to be written again, and a line torn by the kill is cut off.

Files that are replaced whole (``config.toml``, ``nodes.json``) are written to a temporary file
and renamed into place, so they are either the old or the new version, never half of one.

A directory is written by one process at a time. A run (and a comparison) holds an exclusive
``flock`` on ``.fdjax.lock`` inside its directory for as long as it writes there; the kernel drops
the lock when the process dies, however it dies (SIGKILL included), so a killed run never leaves
a stale lock behind to be guessed about, and ``--resume`` after ``kill -9`` takes it at once. The
lock is taken before anything in the directory is cleared or written, so a second process that
finds it held is turned away with the directory exactly as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from fdjax.checkpoint import RunCheckpoints

#: Outputs of a finished run; a fresh run removes stale ones first, and ``nodes.json`` (written
#: last) marks a run as finished.
FINAL_OUTPUTS = ("nodes.json", "global_params.npz", "small_params.npz")
#: The file whose ``flock`` says that a process is writing the directory it is in.
LOCK_NAME = ".fdjax.lock"
#: Files that show a directory holds a run, finished or not.
RUN_FILES = ("config.toml", "metrics.jsonl")


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unwritable(path: Path, err: OSError) -> ValueError:
    return ValueError(f"cannot write to output directory {str(path)!r}: {err.strerror or err}")


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a run, finished or not (its config or its metrics log)."""
    return any((path / name).exists() for name in RUN_FILES)


class DirectoryBusy(ValueError):
    """Another process holds a directory's lock; the one-line message names it and its pid."""


def _make_dirs(path: Path) -> list[Path]:
    """Creates ``path`` and its missing parents; returns those this call created, outermost
    first, so that a failure before anything is written can take them away again."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by another process at the same moment: not ours to remove
        created.append(directory)
    return created


class DirectoryLock:
    """An exclusive lock on a directory, held while this process writes it.

    An OS advisory lock (``flock``) on ``LOCK_NAME`` inside the directory, held on an open file for
    the writer's lifetime: the kernel releases it when the process ends, however it ends, so
    there is no stale lock to detect (unlike a pid file). The holder writes its pid into the file
    only so that a refused process can say who holds it. Releasing removes the file again, and
    every directory that taking the lock had to create and that is still empty, so a run that
    fails before writing anything leaves nothing behind.

    Args:
        path: the directory (created on ``acquire`` when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Takes the lock without waiting.

        Raises:
            DirectoryBusy: another process (or another open of this directory) holds it.
            ValueError: the directory cannot be created or the lock file written.
        """
        if self._fd is not None:
            return self
        try:
            self._created = _make_dirs(self.path)
            while self._fd is None:
                self._fd = self._try_lock()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            self.release()
            raise _unwritable(self.path, err) from err
        except BaseException:
            self.release()
            raise
        return self

    def _try_lock(self) -> int | None:
        """The locked lock file's descriptor; None when its holder removed it meanwhile."""
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"another fdjax process (pid {holder})" if holder else "another fdjax process"
            raise DirectoryBusy(f"{who} is writing {str(self.path)!r}; wait for it to end, or "
                                f"stop it first") from None
        try:
            same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its last holder released and removed it between our open and our lock
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """Removes the lock file and lets the lock go; removes the directories ``acquire``
        created if they are still empty. Does nothing when the lock is not held."""
        if self._fd is not None:
            try:
                self.file.unlink(missing_ok=True)  # while held: no other process has it now
            finally:
                os.close(self._fd)
                self._fd = None
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except OSError:  # written to: keep it, and its parents
                break
        self._created = []

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_and_check(lock: DirectoryLock, check: Callable[[], None]) -> None:
    """Takes ``lock`` before ``check`` looks at the directory, so that what it sees cannot
    change under it; lets the lock go again when the check refuses."""
    lock.acquire()
    try:
        check()
    except BaseException:
        lock.release()
        raise


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


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
        self.lock = DirectoryLock(self.path)

    @property
    def finished(self) -> bool:
        return (self.path / "nodes.json").exists()

    def open(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Takes the directory's lock, then checks that it may be written as asked.

        Nothing but the lock file is written, so a refused run leaves the directory as it was. A
        fresh run into a directory that already holds one is refused unless ``overwrite``: a
        finished run's results are never replaced by accident, and a killed one may be wanted
        back with ``resume``.

        Raises:
            ValueError: naming the directory, with the lock released again: another process
                writes it (``DirectoryBusy``); it holds a run and neither ``overwrite`` nor
                ``resume`` is given; with ``resume``, it holds no run, a finished one, or no
                checkpoint.
        """
        if resume and not (self.path / "config.toml").is_file():
            raise ValueError(f"{str(self.path)!r} is not a run directory (no config.toml)")
        _lock_and_check(self.lock, lambda: self._check(resume, overwrite))

    def _check(self, resume: bool, overwrite: bool) -> None:
        if resume and self.finished:
            raise ValueError(f"the run in {str(self.path)!r} has finished (nodes.json is "
                             f"written); there is nothing to resume")
        if resume:
            self.checkpoints.require_any()
        elif not overwrite and holds_run(self.path):
            raise ValueError(self._taken_message())

    def _taken_message(self) -> str:
        where = str(self.path)
        if self.finished:
            return (f"{where!r} already holds a finished run; pass --overwrite (overwrite=True) "
                    f"to replace it (there is nothing to --resume)")
        return (f"{where!r} already holds an unfinished run; pass --resume {where} to continue "
                f"it, or --overwrite (overwrite=True) to replace it")

    def close(self) -> None:
        """Lets the directory's lock go (see ``DirectoryLock.release``)."""
        self.lock.release()

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
            raise _unwritable(self.path, err) from err

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


#: What ``fdjax compare`` was asked for, written when it starts (see ``ComparisonDirectory``).
COMPARE_RECORD = "compare.json"
COMPARE_FORMAT = 1
#: A comparison's own outputs, in the order written: ``results.json`` last marks it finished.
COMPARE_OUTPUTS = ("figure.png", "table.md", "results.json")
#: The settings a comparison records, all of which a resume must match.
COMPARE_SETTINGS = ("config", "methods", "seeds", "target")


class ComparisonDirectory:
    """The files of one comparison: what it was asked for, a run directory per method and seed,
    and the figure, table and results.

    ``compare.json`` records the config (as TOML), methods, seeds and target when the
    comparison starts, so that ``fdjax compare --resume DIR`` needs nothing else. The comparison
    holds ``DIR``'s lock while it runs (each run holds its own directory's as well).

    Args:
        path: the directory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = DirectoryLock(self.path)

    def run_dir(self, method: str, seed: int) -> Path:
        return self.path / method / f"seed{seed}"

    @property
    def finished(self) -> bool:
        return (self.path / "results.json").exists()

    def holds_comparison(self) -> bool:
        """Whether a comparison (or a run) has written here, finished or not."""
        return ((self.path / COMPARE_RECORD).exists() or holds_run(self.path)
                or any((self.path / name).exists() for name in COMPARE_OUTPUTS)
                or any(self.path.glob("*/seed*/config.toml")))

    @staticmethod
    def record(config_toml: str, methods: list[str], seeds: int, target: float | None) -> dict:
        """What ``compare.json`` holds."""
        return {"format": COMPARE_FORMAT, "config": config_toml, "methods": list(methods),
                "seeds": seeds, "target": target}

    def read_record(self) -> dict:
        """``compare.json``, checked to be one fdjax wrote.

        Raises:
            ValueError: there is none, it cannot be read, or it is not such a record.
        """
        path = self.path / COMPARE_RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{str(self.path)!r} is not a comparison directory (no "
                             f"{COMPARE_RECORD})") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{str(path)!r} cannot be read: {err}") from None
        if (not isinstance(record, dict) or record.get("format") != COMPARE_FORMAT
                or not set(COMPARE_SETTINGS) <= set(record)):
            raise ValueError(f"{str(path)!r} is not a comparison record written by this fdjax")
        return record

    def open(self, record: dict, *, resume: bool = False, overwrite: bool = False) -> None:
        """Takes the directory's lock, then checks that the comparison may start (or resume).

        Raises:
            ValueError: naming the directory, with the lock released again: another process
                writes it; it holds a comparison and neither ``overwrite`` nor ``resume`` is
                given; with ``resume``, it holds no comparison, a finished one, or one asked
                for with other settings than ``record``'s.
        """
        if resume:
            self.read_record()  # before the lock, which would create the directory
        _lock_and_check(self.lock, lambda: self._check(record, resume, overwrite))

    def _check(self, record: dict, resume: bool, overwrite: bool) -> None:
        where = str(self.path)
        if resume and self.finished:
            raise ValueError(f"the comparison in {where!r} has finished (results.json is "
                             f"written); there is nothing to resume")
        if resume:
            recorded = self.read_record()
            differ = [k for k in COMPARE_SETTINGS if recorded[k] != record[k]]
            if differ:
                raise ValueError(f"the comparison in {where!r} was started with other "
                                 f"{', '.join(differ)}; resume it with those in its "
                                 f"{COMPARE_RECORD}")
        elif not overwrite and self.holds_comparison():
            raise ValueError(f"{where!r} already holds a comparison; pass --resume {where} "
                             f"to continue a killed one, or --overwrite (overwrite=True) to "
                             f"replace it")

    def start(self, record: dict) -> None:
        """Clears a previous comparison's outputs and records this one (each run clears its own
        directory when it starts)."""
        try:
            for name in COMPARE_OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
            write_atomic(self.path / COMPARE_RECORD, json.dumps(record, indent=1))
        except OSError as err:
            raise _unwritable(self.path, err) from err

    def close(self) -> None:
        """Lets the directory's lock go."""
        self.lock.release()
