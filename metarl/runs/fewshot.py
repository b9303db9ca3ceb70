"""The few-shot family: tasks (sinusoid regression, Omniglot), model and objective of a config.

One meta-iteration draws ``meta_batch_size`` training tasks with ``split_rng(seed, TRAIN, i)``
and hands them to the learner. Meta-validation draws from ``split_rng(seed, VAL)`` (the same set
every time) and evaluation from ``split_rng(eval_seed, TEST)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import agents  # noqa: F401  (registers the algorithms)
from agents.models import MLP, ConvNet
from metarl.core.functional import inner_lrs
from metarl.core.learner import build_learner
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.objective import FewShotObjective
from metarl.fewshot.omniglot import Omniglot
from metarl.fewshot.sinusoid import SinusoidTasks
from metarl.fewshot.tasks import FewShotSampler
from metarl.runs.experiment import TEST, TRAIN, VAL, Experiment, split_rng
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rundir import RunError


def build_model(cfg: FewShotConfig) -> nn.Module:
    if cfg.family == "sinusoid":
        return MLP(1, cfg.sinusoid.hidden, 1)
    o = cfg.omniglot
    return ConvNet(
        n_way=o.n_way,
        filters=o.filters,
        image_size=o.image_size,
        vmap_safe_norm=cfg.batched,
        channels_last=not cfg.batched,
    )


class TaskSource:
    """Samplers of the train / val / test tasks of a config.

    Training tasks have the shape ``data.k_shot`` / ``data.k_query``; validation and test tasks
    the evaluation shape (``eval.k_shot`` / ``eval.k_query``). Sinusoid tasks are fresh draws of
    the same distribution in every split. Omniglot splits hold out whole characters
    (``omniglot.split: characters``) or whole alphabets (``alphabets``); tasks draw their classes
    across the split's alphabets or, within-alphabet (``omniglot.within_alphabet`` for val/test,
    ``omniglot.train_within_alphabet`` for train), from one alphabet per task. For Omniglot
    ``characters[split]`` names the split's ``(alphabet, character)`` rows.
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
        if o.split == "alphabets":
            split, counts, keys = data.split_alphabets, (o.num_val_alphabets, o.num_test_alphabets), "alphabets"
        else:
            split, counts, keys = data.split, (o.num_val_characters, o.num_test_characters), "characters"
        try:
            splits = split(num_val=counts[0], num_test=counts[1], seed=o.split_seed)
        except ValueError as exc:
            raise RunError(f"omniglot.num_val_{keys} / num_test_{keys}: {exc}") from None
        self.characters = {
            "train": splits.train_characters,
            "val": splits.val_characters,
            "test": splits.test_characters,
        }
        for name, images, shape, within in (
            ("train", splits.train, train_shape, o.train_within_alphabet),
            ("val", splits.val, eval_shape, o.eval_within_alphabet),
            ("test", splits.test, eval_shape, o.eval_within_alphabet),
        ):
            alphabets = [a for a, _ in self.characters[name]] if within else None
            try:
                sampler = FewShotSampler(images, n_way=o.n_way, rotations=o.rotations, alphabets=alphabets, **shape)
            except ValueError as exc:
                raise RunError(f"omniglot task shape does not fit the data ({name} split): {exc}") from None
            setattr(self, name, sampler)


class FewShotExperiment(Experiment):
    """A few-shot run: task samplers, model, objective and learner."""

    def __init__(self, cfg: FewShotConfig) -> None:
        super().__init__(cfg)
        self.tasks = TaskSource(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        n_way = cfg.omniglot.n_way if cfg.family == "omniglot" else 1
        self.objective = FewShotObjective(
            self.model, kind=self.tasks.kind, inner_batch_size=cfg.inner.batch_size, n_way=n_way
        )
        self.learner = build_learner("fewshot", cfg, self.model, self.objective)
        self.metric = "mse" if self.tasks.kind == "regression" else "accuracy"

    def sample(self, split: str, num_tasks: int, rng: np.random.Generator) -> FewShotBatch:
        sampler = getattr(self.tasks, split)
        return sampler.sample(num_tasks, rng).to(self.device)

    def train_iteration(self, it: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        tasks = self.sample("train", self.cfg.meta_batch_size, split_rng(self.cfg.seed, TRAIN, it))
        t1 = time.perf_counter()
        metrics = self.learner.step(tasks, it)
        t2 = time.perf_counter()
        return {**{f"train/{k}": v for k, v in metrics.items()}, "time/sampling": t1 - t0, "time/meta_update": t2 - t1}

    def progress_text(self, row: dict[str, Any]) -> str:
        return f"loss_post {row.get('train/loss_post_adapt', math.nan):.3f}"

    # -- evaluation --------------------------------------------------------------------------
    def curves(self, split: str, num_tasks: int, rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
        """Per-task query metrics after 0..steps inner steps: ``{name: [num_tasks, steps + 1]}``
        (the learner's :meth:`~metarl.core.learner.Learner.adaptation_curve`; one column for a
        learner that adapts without steps).

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
        out = {}
        curves = self.curves("val", self.cfg.eval.val_tasks, split_rng(self.cfg.seed, VAL), self.cfg.eval.steps)
        for name, values in curves.items():
            mean = values.mean(0)
            out[f"val/{name}_pre_adapt"] = float(mean[0])
            out[f"val/{name}_post_adapt"] = float(mean[-1])
        return out

    def evaluation_curve(self, num_tasks: int, steps: int, seed: int) -> np.ndarray:
        return self.curves("test", num_tasks, split_rng(seed, TEST), steps)[self.metric]
