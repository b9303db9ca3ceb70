"""The run skeleton both families share: the train loop, validation, checkpoints, resume, evaluation.

A family (:mod:`metarl.runs.fewshot`, :mod:`metarl.runs.rl`) supplies only how one meta-iteration
draws or samples its tasks and updates the learner (:meth:`Experiment.train_iteration`), how it
validates, and the per-task metric of an evaluation (:meth:`Experiment.evaluation_curve`).

Seeds, in one place: the model is initialised from ``seed``; every random draw of split ``split``
(``TRAIN``, ``VAL``, ``TEST``) comes from ``numpy.random.default_rng([seed, split, *keys])`` (the
keys: the iteration in training, the evaluation seed in evaluation). Nothing else is random, so a
resumed run reaches exactly the result of an uninterrupted one.

Order of writes per iteration: the ``metrics.jsonl`` row, then (every ``checkpoint_every``) the
checkpoint. A kill between the two leaves rows past the checkpoint, which a resume drops and
writes again, so the log never has a gap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metarl.core.learner import Learner
from metarl.runs.rundir import (
    CHECKPOINT,
    MetricsLogger,
    StopRequest,
    resolve_device,
    restore_checkpoint,
    save_checkpoint,
)

#: The splits of every seed: meta-training, meta-validation, held-out evaluation.
TRAIN, VAL, TEST = 0, 1, 2


class TrainingDiverged(RuntimeError):
    """A training loss became non-finite: the run stops before checkpointing the bad state."""


def nonfinite_loss(row: dict[str, Any]) -> str | None:
    """The first training loss of an iteration's row (``train/loss*``, ``loss/*``) that is NaN or
    infinite, or None."""
    for key, value in row.items():
        if key.startswith(("train/loss", "loss/")) and isinstance(value, float) and not math.isfinite(value):
            return key
    return None


def split_rng(seed: int, split: int, *keys: int) -> np.random.Generator:
    """The generator of split ``split`` (``TRAIN``, ``VAL``, ``TEST``) under ``seed`` and ``keys``."""
    return np.random.default_rng([seed, split, *keys])


def mean_and_ci95(values: np.ndarray) -> dict[str, Any]:
    """Per-column mean and 95% CI half-width (1.96 standard errors) over the rows (tasks)."""
    mean = values.mean(0)
    ci95 = 1.96 * values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    return {"mean": [float(x) for x in mean], "ci95": [float(x) for x in ci95], "num_tasks": len(values)}


class Experiment:
    """Everything a run needs, built from its config; subclasses build ``model`` and ``learner``."""

    metric: str  # the evaluation metric's name: accuracy, mse, return

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.model: torch.nn.Module
        self.learner: Learner

    # -- what a family supplies ------------------------------------------------------------
    def train_iteration(self, it: int) -> dict[str, Any]:
        """One meta-update; the row of metrics it logs (without ``iteration``)."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Meta-validation metrics (keys ``val/...``)."""
        raise NotImplementedError

    def evaluation_curve(self, num_tasks: int, steps: int, seed: int) -> np.ndarray:
        """The metric of ``num_tasks`` held-out tasks after 0..steps adaptation steps: ``[num_tasks, steps + 1]``."""
        raise NotImplementedError

    def progress_text(self, row: dict[str, Any]) -> str:
        return ""

    def run_metrics(self) -> dict[str, Any]:
        """Metrics about the run itself, added to each row after validation (e.g. worker replacements)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beyond the model and the learner."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "model": self.model.state_dict(),
            "learner": self.learner.state_dict(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's state; returns its iteration."""
        self.model.load_state_dict(state["model"])
        self.learner.load_state_dict(state.get("learner", {}))
        self.load_extra_state(state)
        return int(state["iteration"])

    def load_checkpoint(self, path: Path) -> int:
        """Load the checkpoint at ``path``; returns its iteration. Any mismatch is a one-line RunError."""
        return int(restore_checkpoint(path, self.load_state_dict, map_location=self.device)["iteration"])

    @classmethod
    def restore(cls, cfg: Any, run_dir: Path) -> tuple[Experiment, int]:
        """An experiment with the latest checkpoint of ``run_dir`` loaded, and its iteration."""
        exp = cls(cfg)
        return exp, exp.load_checkpoint(Path(run_dir) / CHECKPOINT)

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        run_dir: Path,
        *,
        start: int = 0,
        progress: bool = True,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Iterations ``start .. num_iterations - 1``, logging each and checkpointing on schedule.

        ``on_row`` gets each iteration's logged row once it is written and checkpointed (a sweep
        reports it to Ray Tune). A stop request (SIGTERM) ends the loop between iterations with a
        checkpoint of every iteration done. A non-finite training loss raises ``TrainingDiverged``
        before that iteration is logged or checkpointed (the last checkpoint stays as it was).
        """
        cfg = self.cfg
        logger = MetricsLogger(run_dir, start=start)
        bar = tqdm(
            total=cfg.num_iterations,
            initial=start,
            disable=not progress,
            desc=f"{cfg.family}/{cfg.algorithm}",
            unit="it",
        )
        try:
            for it in range(start, cfg.num_iterations):

                def keep(it: int = it) -> None:
                    save_checkpoint(self.state_dict(it), run_dir / CHECKPOINT)

                StopRequest.check(save=keep if it > start else None)  # nothing new to keep before the first
                t0 = time.perf_counter()
                row: dict[str, Any] = {"iteration": it, **self.train_iteration(it)}
                if (bad := nonfinite_loss(row)) is not None:
                    kept = (run_dir / CHECKPOINT).is_file()
                    raise TrainingDiverged(
                        f"iteration {it}: {bad} is {row[bad]}: training diverged; "
                        + ("the last checkpoint is kept" if kept else "no checkpoint was written")
                        + " (lower the learning rates, e.g. inner.lr or outer.lr, and train again)"
                    )
                if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or it + 1 == cfg.num_iterations):
                    row.update(self.validate())
                row.update(self.run_metrics())
                row["time/iteration"] = time.perf_counter() - t0
                logger.log(row)
                if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.num_iterations:
                    save_checkpoint(self.state_dict(it + 1), run_dir / CHECKPOINT)
                if on_row is not None:
                    on_row(row)
                bar.update(1)
                bar.set_postfix_str(self.progress_text(row), refresh=False)
        finally:
            bar.close()
            logger.close()

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, *, num_tasks: int, steps: int, seed: int) -> dict[str, Any]:
        """The metric after 0..steps adaptation steps on ``num_tasks`` held-out tasks, mean and 95% CI
        (``steps: [0]`` for a learner that adapts without steps)."""
        curve = self.evaluation_curve(num_tasks, steps, seed)  # [tasks, steps + 1], or [tasks, 1]
        return {"metric": self.metric, "steps": list(range(curve.shape[1])), **mean_and_ci95(curve)}
