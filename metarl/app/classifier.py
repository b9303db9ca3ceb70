"""Few-shot classification on your own images with a meta-trained Omniglot run.

    clf = FewShotClassifier.from_run("runs/omniglot-maml-...")
    adapted = clf.adapt(["a1.png", "b1.png", ...], ["a", "b", ...])     # one image per class (K-shot: K)
    adapted.predict(["q1.png", "q2.png"])          # -> array of your labels
    adapted.predict_proba(["q1.png"])              # -> [N, n_way] probabilities, columns = adapted.classes_

Images may be file paths, PIL images or arrays/tensors of any size; they go through exactly the
preprocessing of training (:func:`metarl.fewshot.omniglot.preprocess_images`: grayscale,
resized, ink = 1), so dark strokes on a light background, like Omniglot, work best.

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
from metarl.core.functional import Params, adapt, call, inner_lrs, params_of
from metarl.fewshot.images import preprocess_images
from metarl.fewshot.objective import FewShotObjective
from metarl.runs.fewshot import build_model
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rundir import CHECKPOINT, CONFIG, RunError, load_checkpoint


class FewShotClassifier:
    """A meta-trained N-way classifier that adapts to new classes from a few labelled images."""

    def __init__(self, model: torch.nn.Module, cfg: FewShotConfig) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.n_way = cfg.omniglot.n_way
        self.image_size = cfg.omniglot.image_size
        self.objective = FewShotObjective(model, kind="classification")

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
        model = build_model(cfg)
        state = load_checkpoint(run_dir / CHECKPOINT)
        model.load_state_dict(state["model"])
        return cls(model, cfg)

    def adapt(
        self, support_images: Any, support_labels: Sequence[Hashable], steps: int | None = None
    ) -> AdaptedClassifier:
        """Fine-tune on the support set with the run's inner loop (``eval.steps`` steps by default).

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
        lrs = inner_lrs(self.cfg.eval_lr, steps)
        theta = {k: v.detach() for k, v in params_of(self.model).items()}
        with torch.no_grad():
            phi = adapt(lambda p, _step: self.objective.loss(p, x, y), theta, lrs=lrs, first_order=True)
        return AdaptedClassifier(self, phi, x, classes)


class AdaptedClassifier:
    """The result of :meth:`FewShotClassifier.adapt`: predicts the support set's labels."""

    def __init__(
        self, base: FewShotClassifier, params: Params, support_x: torch.Tensor, classes: list[Hashable]
    ) -> None:
        self.base = base
        self.params = params
        self.support_x = support_x
        self.classes_ = classes

    def predict_proba(self, query_images: Any) -> np.ndarray:
        """Class probabilities ``[N, n_way]``; column ``j`` is ``classes_[j]``."""
        q = preprocess_images(query_images, image_size=self.base.image_size)
        with torch.no_grad():
            logits = call(self.base.model, self.params, torch.cat([self.support_x, q]))[len(self.support_x) :]
        return torch.softmax(logits, -1).numpy()

    def predict(self, query_images: Any) -> np.ndarray:
        """Predicted labels ``[N]`` (the labels given to :meth:`FewShotClassifier.adapt`)."""
        labels = np.empty(len(self.classes_), dtype=object)
        labels[:] = self.classes_
        return labels[self.predict_proba(query_images).argmax(-1)]
