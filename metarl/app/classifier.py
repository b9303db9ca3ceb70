"""Few-shot classification on your own images with a meta-trained Omniglot run.

    clf = FewShotClassifier.from_run("runs/omniglot-maml-...")
    adapted = clf.adapt(["a1.png", "b1.png", ...], ["a", "b", ...])     # one image per class (K-shot: K)
    adapted.predict(["q1.png", "q2.png"])          # -> array of your labels
    adapted.predict_proba(["q1.png"])              # -> [N, n_way] probabilities, columns = adapted.classes_

Images may be file paths, PIL images or arrays/tensors of any size; they go through exactly the
preprocessing of training (:func:`metarl.fewshot.omniglot.preprocess_images`: grayscale,
resized, ink = 1), so dark strokes on a light background, like Omniglot, work best.

Every few-shot method of the lab works here: the classifier adapts and predicts through the run's
learner (``adapt_task`` / ``task_outputs`` of :class:`metarl.core.learner.Learner`): gradient-based
methods fine-tune on the support set, metric-based ones compare each query with it.

Batch norm normalises with the statistics of the batch it sees (as in MAML). Adaptation sees the
support set; prediction classifies the query images in one batch together with the support set,
so any number of query images, even one, is handled, and a query image's prediction depends on
the support set and on the other images of the same call.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.core.config_files import load_config
from metarl.core.functional import inner_lrs
from metarl.core.learner import Learner, build_learner
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.images import preprocess_images
from metarl.fewshot.objective import FewShotObjective
from metarl.runs.fewshot import build_model
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rundir import CHECKPOINT, CONFIG, RunError, load_checkpoint


class FewShotClassifier:
    """A meta-trained N-way classifier that adapts to new classes from a few labelled images."""

    def __init__(self, learner: Learner, cfg: FewShotConfig) -> None:
        self.learner = learner
        self.model = learner.model.eval()
        self.cfg = cfg
        self.n_way = cfg.omniglot.n_way
        self.image_size = cfg.omniglot.image_size

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> FewShotClassifier:
        """Load the latest checkpoint of an Omniglot run directory written by ``metarl train``."""
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG).is_file():
            raise RunError(f"{run_dir} is not a metarl run directory (no {CONFIG})")
        cfg = load_config(FewShotConfig, run_dir / CONFIG)
        if cfg.family != "omniglot":
            raise RunError(
                f"{run_dir} is a {cfg.family!r} run; FewShotClassifier needs an image-classification run "
                "(family: omniglot)"
            )
        cfg.device = "cpu"
        model = build_model(cfg)
        learner = build_learner(
            "fewshot", cfg, model, FewShotObjective(model, kind="classification", n_way=cfg.omniglot.n_way)
        )
        state = load_checkpoint(run_dir / CHECKPOINT)
        model.load_state_dict(state["model"])
        learner.load_state_dict(state.get("learner", {}))
        return cls(learner, cfg)

    def adapt(
        self, support_images: Any, support_labels: Sequence[Hashable], steps: int | None = None
    ) -> AdaptedClassifier:
        """Adapt to the support set as the run's method does: the inner loop for ``steps`` steps
        (``eval.steps`` by default) for gradient-based methods; metric-based methods keep the
        support set and compare queries with it (``steps`` does not apply).

        ``support_labels`` may be any hashable labels (strings, ints); there must be exactly
        ``n_way`` distinct ones, the number of classes the run was meta-trained for.
        """
        x = preprocess_images(support_images, image_size=self.image_size)
        labels = list(support_labels)
        if len(labels) != len(x):
            raise ValueError(f"got {len(x)} support images but {len(labels)} labels; give one label per image")
        classes = list(dict.fromkeys(labels))
        if len(classes) != self.n_way:
            raise ValueError(
                f"this run was meta-trained for {self.n_way}-way tasks; the support set has "
                f"{len(classes)} distinct labels {classes}: give exactly {self.n_way} classes"
            )
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[c] for c in labels])
        steps = self.cfg.eval.steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        order = torch.argsort(y, stable=True)  # class-major, as the task samplers give support sets
        task = FewShotBatch(x[order], y[order], x[:0], y[:0])
        adapted = self.learner.adapt_task(task, inner_lrs(self.cfg.eval_lr, steps))
        return AdaptedClassifier(self, adapted, x[order], classes)


class AdaptedClassifier:
    """The result of :meth:`FewShotClassifier.adapt`: predicts the support set's labels.

    ``params`` is what the method kept from the support set: the adapted parameters of a
    gradient-based method (``{name: tensor}``), the support embeddings or set of a metric-based one.
    """

    def __init__(self, base: FewShotClassifier, adapted: Any, support_x: torch.Tensor, classes: list[Hashable]) -> None:
        self.base = base
        self.params = adapted
        self.support_x = support_x
        self.classes_ = classes

    def predict_proba(self, query_images: Any) -> np.ndarray:
        """Class probabilities ``[N, n_way]``; column ``j`` is ``classes_[j]``."""
        q = preprocess_images(query_images, image_size=self.base.image_size)
        logits = self.base.learner.task_outputs(self.params, self.support_x, q)
        return torch.softmax(logits, -1).numpy()

    def predict(self, query_images: Any) -> np.ndarray:
        """Predicted labels ``[N]`` (the labels given to :meth:`FewShotClassifier.adapt`)."""
        labels = np.empty(len(self.classes_), dtype=object)
        labels[:] = self.classes_
        return labels[self.predict_proba(query_images).argmax(-1)]
