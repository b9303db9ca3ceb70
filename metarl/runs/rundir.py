"""Run directories: resolved config, atomic checkpoints, ``metrics.jsonl`` and TensorBoard.

A run directory holds::

    config.yaml          the resolved config (every key, defaults filled in)
    checkpoint.pt        the latest checkpoint, replaced atomically
    metrics.jsonl        one JSON object per meta-iteration, same keys as the TensorBoard tags
    events.out.tfevents.*  TensorBoard event files
    train.lock           held (``flock``) by the one ``metarl train`` writing the run; holds its pid

Writes into a run (or an output directory) go through :func:`writing`, which turns filesystem
failures into one-line :class:`RunWriteError` messages naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from metarl.core.atomic import atomic_open

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = "train.lock"


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message says why and what to do."""


class RunWriteError(RunError, OSError):
    """A write that failed (read-only, full disk, not a directory...): one line naming the path and
    the cause. Also an ``OSError`` (``errno`` kept), so callers that handle filesystem errors still do."""


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded (no space left for this user)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a part of the path exists and is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "file name too long",
}


def _torch_write_failure(exc: BaseException) -> bool:
    """torch.save's C++ writer reports a short write (a full disk) as a RuntimeError such as
    ``[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 256``, never saying "no space"."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@contextmanager
def writing(path: str | os.PathLike, *, note: str = "") -> Iterator[None]:
    """Run a write of ``path``; an ``OSError`` (or torch.save's short-write RuntimeError) becomes a
    :class:`RunWriteError` ``cannot write PATH: CAUSE[; NOTE]``. Other exceptions pass unchanged."""
    try:
        yield
    except RunError:
        raise
    except OSError as exc:
        cause = _CAUSES.get(exc.errno) or (exc.strerror or _first_line(exc)).lower()
        where = (
            exc.filename
            if exc.filename and Path(exc.filename).name[:1] != "." and os.fspath(exc.filename) != os.fspath(path)
            else None
        )
        err = RunWriteError(
            f"cannot write {path}: {cause}" + (f" ({where})" if where else "") + (f"; {note}" if note else "")
        )
        err.errno = exc.errno
        raise err from exc
    except RuntimeError as exc:
        if not _torch_write_failure(exc):
            raise
        err = RunWriteError(
            f"cannot write {path}: the write stopped short, most likely no space left on device "
            f"(torch: {_first_line(exc)})" + (f"; {note}" if note else "")
        )
        err.errno = errno.ENOSPC
        raise err from exc


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`RunWriteError` unless directory ``path`` exists and is writable, or could be
    created (its nearest existing ancestor is a writable directory). Cheap: call it before long work."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunWriteError(f"cannot write {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        cause = "read-only file system" if readonly else "permission denied"
        raise RunWriteError(f"cannot write {path}: {cause}" + (f" ({probe})" if probe != path else ""))


def require_run_dir(run_dir: str | os.PathLike, *, what: str = "a metarl run directory") -> Path:
    """``run_dir`` as a Path; a RunError when it does not exist or is a file (the caller checks its contents)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist: not {what}; check the path")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not {what}")
    return run_dir


@contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``RUN_DIR/train.lock`` for the block: one writer per run directory.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the open file: the kernel releases it when the process
    ends, however it ends, so a killed run leaves no stale lock. The holder writes ``PID HOST``
    into the file; a second writer gets a :class:`RunError` naming the directory and that pid.
    Yields the lock file's path. The file itself stays (removing it would race with a new holder).
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    with writing(path, note="the run directory must be writable to train into it"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunWriteError(f"cannot lock {path}: {exc.strerror or exc}") from None
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            who = f" (pid {holder[0]}{' on ' + holder[1] if len(holder) > 1 else ''})" if holder else ""
            raise RunError(
                f"run directory {run_dir} is in use by another metarl process{who}: one `metarl train` "
                f"writes a run at a time; wait for it to end or stop it (lock: {path})"
            ) from None
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a free lock names no holder
    finally:
        os.close(fd)  # releases the lock


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: 'cuda' was asked for but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` to a temp file beside ``path``, then rename it over.

    A process killed at any moment leaves either the previous checkpoint or the new one; a failed
    write (full disk, read-only directory) raises :class:`RunWriteError` and also keeps the old one.
    """
    with writing(path, note="the previous checkpoint is kept"), atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: the run has not written one yet (train it first)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file; torch's own text spans lines and suggests unsafe loading
        raise RunError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}): it is damaged or not a metarl checkpoint; "
            "delete it to restart the run, or restore a good copy"
        ) from None
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise RunError(f"checkpoint {path} is not a metarl checkpoint (expected keys 'iteration' and 'model')")
    return state


def restore_checkpoint(path: str | os.PathLike, apply, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint at ``path`` and hand its state to ``apply(state)``; returns the state.

    A state that does not fit (``apply`` raising RuntimeError, KeyError, ValueError or
    TypeError: shapes, missing keys) becomes one ``RunError`` line.
    """
    state = load_checkpoint(path, map_location=map_location)
    try:
        apply(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or type(exc).__name__
        raise RunError(
            f"checkpoint {path} does not fit the run's config.yaml ({detail}); was config.yaml edited after training?"
        ) from None
    return state


class MetricsLogger:
    """Writes each iteration's metrics to ``metrics.jsonl`` and to TensorBoard with the same keys.

    On resume from iteration ``start``, rows at or after ``start`` are dropped from
    ``metrics.jsonl``, and the TensorBoard event files are rebuilt from the rows kept (they hold
    the same keys), so a resumed run's logs read as if it had never stopped. Rebuilding, rather
    than TensorBoard's ``purge_step``, does not depend on the order in which TensorBoard reads
    two event files written within the same second.
    """

    def __init__(self, run_dir: str | os.PathLike, *, start: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        self.path = run_dir / METRICS
        kept: list[str] = []
        if start > 0 and self.path.exists():
            kept = [json.dumps(row) for row in _parse_metrics(self.path) if row["iteration"] < start]
        with writing(self.path):
            with atomic_open(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            self._file = self.path.open("a")
        with writing(run_dir):
            for old in run_dir.glob("events.out.tfevents.*"):
                old.unlink()
            self.writer = SummaryWriter(log_dir=str(run_dir))
        for line in kept:
            self._write_scalars(json.loads(line))

    def _write_scalars(self, row: dict[str, Any]) -> None:
        step = int(row["iteration"])
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def log(self, row: dict[str, Any]) -> None:
        self._write_scalars(row)
        with writing(self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        try:
            with writing(self.path):
                self._file.close()
        finally:
            self.writer.close()


def _parse_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a torn last line (a write cut by a full disk or a kill) is
    dropped, any other line that is not a JSON object with an ``iteration`` is a RunError."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            if number == len(lines):
                break
            raise RunError(
                f"{path} line {number} is not a metrics row (a JSON object with an 'iteration'); "
                "the file was edited or damaged"
            )
        rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a torn last line is left out)."""
    return _parse_metrics(Path(run_dir) / METRICS)


class StopRequest:
    """A stop asked for from outside (SIGTERM): training loops honour it between iterations.

    Raising from the signal handler itself could interrupt a checkpoint or log write half way;
    the first request is only recorded, a second one interrupts at once.
    """

    requested = False

    @classmethod
    def handle_sigterm(cls, signum: int, frame: Any) -> None:
        if cls.requested:
            raise KeyboardInterrupt
        cls.requested = True

    @classmethod
    def check(cls, save: Callable[[], None] | None = None) -> None:
        """Raise KeyboardInterrupt (stop like Ctrl-C) if a stop was requested, after ``save()``:
        the training loops pass the checkpoint of the iterations done, so a stop loses none."""
        if cls.requested:
            if save is not None:
                save()
            raise KeyboardInterrupt
