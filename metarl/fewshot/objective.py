"""The few-shot family's :class:`~metarl.core.metalearning.MetaObjective`: MSE or cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metarl.core.functional import Params, call
from metarl.fewshot.batch import FewShotBatch


class FewShotObjective:
    """Support loss and query metrics of one few-shot task (a :class:`FewShotBatch` slice).

    With ``inner_batch_size`` set, inner step ``s`` takes its loss on ``inner_batch_size``
    support examples instead of all of them (Reptile's minibatches): the support set, read in
    shot-major order (shot 0 of every class, then shot 1, ...), is walked through in turn, so
    every class is equally represented and ``n / inner_batch_size`` steps see every example.
    Support sets are class-major (``n_way`` classes x ``k`` shots, as the samplers give them);
    regression tasks are one "class". A batch size at least the support size means all of it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: Literal["classification", "regression"],
        inner_batch_size: int | None = None,
        n_way: int = 1,
    ) -> None:
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ValueError(f"inner_batch_size must be a positive integer or None, got {inner_batch_size!r}")
        self.model = model
        self.kind = kind
        self.inner_batch_size = inner_batch_size
        self.n_way = n_way

    def support_indices(self, n: int, step: int) -> torch.Tensor | None:
        """Indices of the support examples of inner step ``step`` (None: all ``n``)."""
        b = self.inner_batch_size
        if b is None or b >= n:
            return None
        if n % self.n_way:
            raise ValueError(f"support size {n} is not a multiple of n_way={self.n_way}")
        pos = (step * b + torch.arange(b)) % n  # positions in shot-major order
        return (pos % self.n_way) * (n // self.n_way) + pos // self.n_way  # class-major rows

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = call(self.model, params, x)
        if self.kind == "regression":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    def support_loss(self, params: Params, task: FewShotBatch, step: int) -> torch.Tensor:
        idx = self.support_indices(task.support_y.shape[0], step)
        if idx is None:
            return self.loss(params, task.support_x, task.support_y)
        idx = idx.to(task.support_y.device)
        return self.loss(params, task.support_x[idx], task.support_y[idx])

    def query_metrics(self, params: Params, task: FewShotBatch) -> dict[str, torch.Tensor]:
        out = call(self.model, params, task.query_x)
        if self.kind == "regression":
            return {"loss": F.mse_loss(out, task.query_y)}
        accuracy = (out.argmax(-1) == task.query_y).float().mean()
        return {"loss": F.cross_entropy(out, task.query_y), "accuracy": accuracy}
