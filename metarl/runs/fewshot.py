"""A few-shot experiment: build the task family and meta-learner from a config, train, evaluate.

Seeding: the model is initialised from ``seed``; the tasks of iteration ``i`` are drawn from
``numpy.random.default_rng([seed, TRAIN, i])``, the meta-validation tasks from
``default_rng([seed, VAL])`` (the same set at every validation) and the evaluation tasks from
``default_rng([eval_seed, TEST])``. Nothing else is random, so a run resumed from a
checkpoint reaches exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from metarl.fewshot.batch import FewShotBatch
from metarl.runs.fewshot_config import FewShotConfig
from agents.models import MLP, ConvNet
from metarl.fewshot.objective import FewShotObjective
from metarl.fewshot.omniglot import FewShotSampler, Omniglot
from metarl.fewshot.sinusoid import SinusoidTasks
from metarl.core.functional import inner_lrs
from metarl.core.metalearning import FOMAML, MAML, MetaLearner, Pretrain, Reptile
from metarl.runs.rundir import (CHECKPOINT, MetricsLogger, RunError, StopRequest, resolve_device, restore_checkpoint,
                        save_checkpoint)

TRAIN, VAL, TEST = 0, 1, 2


def build_model(cfg: FewShotConfig) -> nn.Module:
    if cfg.family == "sinusoid":
        return MLP(1, cfg.sinusoid.hidden, 1)
    o = cfg.omniglot
    return ConvNet(n_way=o.n_way, filters=o.filters, image_size=o.image_size,
                   vmap_safe_norm=cfg.batched, channels_last=not cfg.batched)


class TaskSource:
    """Samplers of the train / val / test tasks of a config.

    Training tasks have the shape ``data.k_shot`` / ``data.k_query``; validation and test tasks
    the evaluation shape (``eval.k_shot`` / ``eval.k_query``). Sinusoid tasks are fresh draws of
    the same distribution in every split; Omniglot splits hold out whole characters.
    """

    def __init__(self, cfg: FewShotConfig) -> None:
        train_shape = {"k_shot": cfg.data.k_shot, "k_query": cfg.data.k_query}
        eval_shape = {"k_shot": cfg.eval_k_shot, "k_query": cfg.eval_k_query}
        if cfg.family == "sinusoid":
            self.kind = "regression"
            s = cfg.sinusoid
            ranges = {"amplitude": s.amplitude, "phase": s.phase, "x_range": s.x_range}
            self.train = SinusoidTasks(**train_shape, **ranges)
            self.val = self.test = SinusoidTasks(**eval_shape, **ranges)
            return
        self.kind = "classification"
        o = cfg.omniglot
        data = Omniglot.load(o.root, image_size=o.image_size)
        try:
            splits = data.split(num_val=o.num_val_characters, num_test=o.num_test_characters, seed=o.split_seed)
        except ValueError as exc:
            raise RunError(f"omniglot.num_val_characters / num_test_characters: {exc}") from None
        try:
            self.train = FewShotSampler(splits.train, n_way=o.n_way, rotations=o.rotations, **train_shape)
            self.val = FewShotSampler(splits.val, n_way=o.n_way, rotations=o.rotations, **eval_shape)
            self.test = FewShotSampler(splits.test, n_way=o.n_way, rotations=o.rotations, **eval_shape)
        except ValueError as exc:
            raise RunError(f"omniglot task shape does not fit the data: {exc}") from None


def build_learner(cfg: FewShotConfig, model: nn.Module, objective: FewShotObjective) -> MetaLearner:
    lrs = inner_lrs(cfg.inner.lr, cfg.inner.steps)
    common = dict(inner_lrs=lrs, batched=cfg.batched)
    if cfg.algorithm == "maml":
        return MAML(model, objective, outer_lr=cfg.outer.lr, **common)
    if cfg.algorithm == "fomaml":
        return FOMAML(model, objective, outer_lr=cfg.outer.lr, **common)
    if cfg.algorithm == "pretrain":
        return Pretrain(model, objective, outer_lr=cfg.outer.lr, **common)
    return Reptile(model, objective, epsilon_start=cfg.outer.epsilon_start, epsilon_end=cfg.outer.epsilon_end,
                   num_iterations=cfg.num_iterations, **common)


class FewShotExperiment:
    """Everything a run needs, built from its config: tasks, model, objective, learner."""

    def __init__(self, cfg: FewShotConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.tasks = TaskSource(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        n_way = cfg.omniglot.n_way if cfg.family == "omniglot" else 1
        self.objective = FewShotObjective(self.model, kind=self.tasks.kind, inner_batch_size=cfg.inner.batch_size, n_way=n_way)
        self.learner = build_learner(cfg, self.model, self.objective)
        self.metric = "mse" if self.tasks.kind == "regression" else "accuracy"

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "model": self.model.state_dict(), "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's state; returns its iteration."""
        self.model.load_state_dict(state["model"])
        self.learner.load_state_dict(state.get("learner", {}))
        return int(state["iteration"])

    def load_checkpoint(self, path: Path) -> int:
        """Load the checkpoint at ``path``; returns its iteration. Any mismatch is a one-line RunError."""
        return int(restore_checkpoint(path, self.load_state_dict, map_location=self.device)["iteration"])

    # -- tasks -------------------------------------------------------------------------------
    def sample(self, split: str, num_tasks: int, rng: np.random.Generator) -> FewShotBatch:
        sampler = getattr(self.tasks, split)
        return sampler.sample(num_tasks, rng).to(self.device)

    # -- evaluation --------------------------------------------------------------------------
    def curves(self, split: str, num_tasks: int, rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
        """Per-task query metrics after 0..steps inner steps: ``{name: [num_tasks, steps + 1]}``.

        Names: ``mse`` for regression; ``loss`` (cross-entropy) and ``accuracy`` for classification.
        """
        lrs = inner_lrs(self.cfg.eval_lr, steps)
        rows: dict[str, list[np.ndarray]] = {}
        for start in range(0, num_tasks, self.cfg.eval.chunk):
            batch = self.sample(split, min(self.cfg.eval.chunk, num_tasks - start), rng)
            for key, value in self.learner.adaptation_curve(batch, lrs).items():
                name = "mse" if self.metric == "mse" and key == "loss" else key
                rows.setdefault(name, []).append(value.cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in rows.items()}

    def validate(self) -> dict[str, float]:
        rng = np.random.default_rng([self.cfg.seed, VAL])
        out = {}
        for name, values in self.curves("val", self.cfg.eval.val_tasks, rng, self.cfg.eval.steps).items():
            mean = values.mean(0)
            out[f"val/{name}_pre_adapt"] = float(mean[0])
            out[f"val/{name}_post_adapt"] = float(mean[-1])
        return out

    # -- training ----------------------------------------------------------------------------
    def train(self, run_dir: Path, *, start: int = 0, progress: bool = True) -> None:
        cfg = self.cfg
        logger = MetricsLogger(run_dir, start=start)
        bar = tqdm(total=cfg.num_iterations, initial=start, disable=not progress, desc=f"{cfg.family}/{cfg.algorithm}", unit="it")
        try:
            for it in range(start, cfg.num_iterations):
                StopRequest.check(save=(lambda: save_checkpoint(self.state_dict(it), run_dir / CHECKPOINT))
                                  if it > start else None)  # nothing new to keep before the first iteration
                t0 = time.perf_counter()
                tasks = self.sample("train", cfg.meta_batch_size, np.random.default_rng([cfg.seed, TRAIN, it]))
                t1 = time.perf_counter()
                metrics = self.learner.step(tasks, it)
                t2 = time.perf_counter()
                row: dict[str, Any] = {"iteration": it}
                row.update({f"train/{k}": v for k, v in metrics.items()})
                if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or it + 1 == cfg.num_iterations):
                    row.update(self.validate())
                if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.num_iterations:
                    save_checkpoint(self.state_dict(it + 1), run_dir / CHECKPOINT)
                row.update({"time/sampling": t1 - t0, "time/meta_update": t2 - t1, "time/iteration": time.perf_counter() - t0})
                logger.log(row)
                bar.update(1)
                post = row.get("train/loss_post_adapt", math.nan)
                bar.set_postfix_str(f"loss_post {post:.3f}", refresh=False)
        finally:
            bar.close()
            logger.close()

    def evaluate(self, *, num_tasks: int, steps: int, seed: int) -> dict[str, Any]:
        """Metric after 0..steps inner steps on ``num_tasks`` held-out tasks, mean and 95% CI."""
        values = self.curves("test", num_tasks, np.random.default_rng([seed, TEST]), steps)[self.metric]
        mean = values.mean(0)
        ci95 = 1.96 * values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
        return {
            "metric": self.metric,
            "steps": list(range(steps + 1)),
            "mean": [float(x) for x in mean],
            "ci95": [float(x) for x in ci95],
            "num_tasks": int(len(values)),
        }


def restore(cfg: FewShotConfig, run_dir: Path) -> tuple[FewShotExperiment, int]:
    """An experiment with the latest checkpoint of ``run_dir`` loaded, and its iteration."""
    exp = FewShotExperiment(cfg)
    return exp, exp.load_checkpoint(run_dir / CHECKPOINT)
