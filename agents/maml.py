"""MAML (Finn et al., 2017) with a gradient-based outer step, for both families.

    phi_i  = theta - lr * grad_theta L_support(theta; task i)         (inner loop, per task)
    L_meta = mean_i L_query(phi_i(theta); task i)
    theta <- Adam(theta, grad_theta L_meta)                             (second order through phi)

``first_order=True`` treats each inner gradient as a constant (FOMAML: ``d phi / d theta = I``).
The objective decides what the losses are: cross-entropy or MSE of a few-shot task
(:class:`metarl.core.metalearning.TaskwiseObjective`), or REINFORCE inside and the
importance-weighted surrogate outside for policies (:class:`metarl.rl.objective.PolicyGradientObjective`).
MAML with a trust-region outer step is :mod:`agents.maml_trpo`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from metarl.core.functional import Params, StepLR, inner_lrs, params_of
from metarl.core.learner import Learner, register
from metarl.core.metalearning import batch_objective


def means(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-task metrics ``[T]`` (or scalars) as their means over the meta-batch."""
    return {k: float(v.mean()) for k, v in metrics.items()}


class MAML(Learner):
    """MAML, second order unless ``first_order``; Adam on the post-adaptation query loss.

    Args:
        model: the meta-model (``theta``; updated in place by :meth:`step`).
        objective: a per-task few-shot objective (mapped over tasks, ``batched`` selecting vmap
            or a loop) or a meta-batch objective such as the RL family's.
        inner_lrs: inner learning rate of each inner step (a float, or one per parameter name).
        outer_lr: Adam learning rate (``None``: no Adam, for subclasses with their own outer step).
        adapted: the parameters the inner loop moves (None: all; ANIL: the head's), few-shot only.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        inner_lrs: Sequence[StepLR],
        outer_lr: float | None = 1e-3,
        first_order: bool = False,
        batched: bool = True,
        adapted: Collection[str] | None = None,
    ) -> None:
        self.model = model
        self.objective = batch_objective(objective, batched=batched, adapted=adapted)
        self.inner_lrs = list(inner_lrs)
        self.first_order = first_order
        self.batched = batched
        if (
            batched
            and not first_order
            and self.inner_lrs
            and objective is not self.objective
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        ):
            raise ValueError(
                "second-order MAML with batched=True through torch's batch norm gives wrong meta-gradients "
                "(a PyTorch vmap bug); use batched=False, or a vmap-safe norm (ConvNet(vmap_safe_norm=True))"
            )
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr) if outer_lr is not None else None

    def meta_loss(self, params: Params, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean post-adaptation query loss over the meta-batch, differentiable in ``params``,
        and per-task metrics (detached)."""
        return self.objective.meta_loss(params, batch, lrs=self.inner_lrs, first_order=self.first_order)

    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.meta_loss(params_of(self.model), batch)
        loss.backward()
        self.optimizer.step()
        return means(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()} if self.optimizer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class FOMAML(MAML):
    """First-order MAML: the meta-gradient is the query gradient at the adapted parameters."""

    def __init__(self, model: nn.Module, objective: Any, **kwargs: Any) -> None:
        super().__init__(model, objective, first_order=True, **kwargs)


@register("maml", family="fewshot")
def build_maml(cfg: Any, model: nn.Module, objective: Any) -> MAML:
    return MAML(
        model, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps), outer_lr=cfg.outer.lr, batched=cfg.batched
    )


@register("fomaml", family="fewshot")
def build_fomaml(cfg: Any, model: nn.Module, objective: Any) -> FOMAML:
    return FOMAML(
        model, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps), outer_lr=cfg.outer.lr, batched=cfg.batched
    )
