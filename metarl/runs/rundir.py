"""Run directories: resolved config, atomic checkpoints, ``metrics.jsonl`` and TensorBoard.

A run directory holds::

    config.yaml          the resolved config (every key, defaults filled in)
    checkpoint.pt        the latest checkpoint, replaced atomically
    metrics.jsonl        one JSON object per meta-iteration, same keys as the TensorBoard tags
    events.out.tfevents.*  TensorBoard event files
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metarl.core.atomic import atomic_open

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message says why and what to do."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: 'cuda' was asked for but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` to a temp file beside ``path``, then rename it over.

    A process killed at any moment leaves either the previous checkpoint or the new one.
    """
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: the run has not written one yet (train it first)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file; torch's own text spans lines and suggests unsafe loading
        raise RunError(f"checkpoint {path} cannot be read ({type(exc).__name__}): it is damaged or not a metarl checkpoint; "
                       "delete it to restart the run, or restore a good copy") from None
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
        raise RunError(f"checkpoint {path} does not fit the run's config.yaml ({detail}); "
                       "was config.yaml edited after training?") from None
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
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] < start]
        for old in run_dir.glob("events.out.tfevents.*"):
            old.unlink()
        with atomic_open(self.path, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
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
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
