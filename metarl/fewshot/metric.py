"""The base of metric-based few-shot learners: classify a task's queries by comparing them with its support set.

A metric-based learner has no inner loop: "adapting" to a task is embedding its support set, and
a query's class comes from comparing its embedding with the support embeddings (prototypes,
attention, a learned relation, a verification score). One meta-iteration is one Adam step on
the mean query loss of the meta-batch. A subclass writes :meth:`MetricLearner.task_logits`
(one task, any learned comparison modules in ``self.modules``) and, if its loss is not the
cross-entropy of those logits, :meth:`MetricLearner.task_loss`.

Tasks are the few-shot family's :class:`~metarl.fewshot.batch.FewShotBatch`: support sets are
class-major (``n_way`` classes x ``k_shot`` images), labels ``0..n_way-1``. The support and query
images of a task go through the backbone in one batch, so batch norm (batch statistics, as in
MAML) normalises them together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metarl.core.functional import Params, call, params_of
from metarl.core.learner import Learner
from metarl.core.metalearning import map_tasks
from metarl.fewshot.batch import FewShotBatch


def embed(backbone: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Flat embeddings ``[B, D]`` of images ``[B, C, H, W]``: the conv blocks of a
    :class:`agents.models.ConvNet` (its linear head is not used by metric-based learners)."""
    features = {k.removeprefix("features."): v for k, v in params.items() if k.startswith("features.")}
    return call(backbone.features, features, x).flatten(1)


def one_hot(labels: torch.Tensor, n_way: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Indicators ``[..., n_way]`` of labels ``[...]`` in ``0..n_way-1`` (vmap-safe, unlike ``F.one_hot``)."""
    return (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(dtype)


def class_means(embeddings: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding of each class ``[n_way, D]`` of class-major support embeddings ``[n_way * K, D]``."""
    return embeddings.view(n_way, -1, embeddings.shape[-1]).mean(1)


class MetricLearner(Learner):
    """A few-shot classifier that compares queries with the support set; Adam on the query loss.

    Args:
        model: the backbone, a :class:`agents.models.ConvNet` (``theta``; its conv blocks embed).
        n_way: classes per task.
        outer_lr: Adam learning rate of the backbone and of ``modules``.
        modules: learned comparison modules (a relation network, full-context embedding LSTMs),
            checkpointed with the learner.
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    inner_lrs: list[float] = []

    def __init__(
        self,
        model: nn.Module,
        *,
        n_way: int,
        outer_lr: float = 1e-3,
        modules: nn.Module | None = None,
        batched: bool = False,
    ) -> None:
        self.model = model
        self.objective = None
        self.n_way = n_way
        self.batched = batched
        device = next(model.parameters()).device
        self.modules = (modules if modules is not None else nn.Module()).to(device)
        self.optimizer = torch.optim.Adam([*model.parameters(), *self.modules.parameters()], lr=outer_lr)

    # -- what a subclass writes ----------------------------------------------------------------
    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Class scores ``[Q, n_way]`` of one task's queries, from backbone ``params``."""
        raise NotImplementedError

    def task_loss(self, params: Params, task: FewShotBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one task and its query metrics (``loss``, ``accuracy``)."""
        logits = self.task_logits(params, task.support_x, task.support_y, task.query_x)
        loss = F.cross_entropy(logits, task.query_y)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == task.query_y).float().mean()}

    # -- the learner interface ----------------------------------------------------------------
    def step(self, batch: FewShotBatch, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        losses, metrics = map_tasks(self.task_loss, params_of(self.model), batch, batched=self.batched)
        losses.mean().backward()
        self.optimizer.step()
        return {f"{k}_post_adapt": float(v.mean()) for k, v in metrics.items()}

    def adaptation_curve(self, tasks: FewShotBatch, lrs: Any = ()) -> dict[str, torch.Tensor]:
        """Query ``loss`` and ``accuracy`` of each task, ``[T, 1]`` (no adaptation steps)."""
        with torch.no_grad():
            _, metrics = map_tasks(self.task_loss, self.theta(), tasks, batched=self.batched)
        return {k: v.unsqueeze(1) for k, v in metrics.items()}

    def adapt_task(self, task: FewShotBatch, lrs: Any = ()) -> FewShotBatch:
        """A metric-based learner keeps the support set itself."""
        return task

    def task_outputs(self, adapted: FewShotBatch, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.task_logits(self.theta(), support_x, adapted.support_y, query_x)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "modules": self.modules.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "modules" in state:
            self.modules.load_state_dict(state["modules"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
