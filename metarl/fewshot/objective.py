"""The few-shot family's :class:`~metarl.metalearners.MetaObjective`: MSE or cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metarl.fewshot.batch import FewShotBatch
from metarl.functional import Params, call


class FewShotObjective:
    """Support loss and query metrics of one few-shot task (a :class:`FewShotBatch` slice)."""

    def __init__(self, model: nn.Module, *, kind: Literal["classification", "regression"]) -> None:
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
        self.model = model
        self.kind = kind

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = call(self.model, params, x)
        if self.kind == "regression":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    def support_loss(self, params: Params, task: FewShotBatch, step: int) -> torch.Tensor:
        return self.loss(params, task.support_x, task.support_y)

    def query_metrics(self, params: Params, task: FewShotBatch) -> dict[str, torch.Tensor]:
        out = call(self.model, params, task.query_x)
        if self.kind == "regression":
            return {"loss": F.mse_loss(out, task.query_y)}
        accuracy = (out.argmax(-1) == task.query_y).float().mean()
        return {"loss": F.cross_entropy(out, task.query_y), "accuracy": accuracy}
