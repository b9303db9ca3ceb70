"""Meta-SGD (Li et al., 2017): MAML that also meta-learns a learning rate for every coordinate of ``theta``.

    phi_i  = theta - alpha * grad_theta L_support(theta; task i)      (alpha: same shape as theta, elementwise)
    L_meta = mean_i L_query(phi_i(theta, alpha); task i)
    (theta, alpha) <- Adam((theta, alpha), grad_(theta, alpha) L_meta)  (second order through phi, as MAML)

``alpha`` holds both the step size and, through its signs and relative sizes, the update
direction. With ``inner.steps`` > 1 every inner step uses the same ``alpha`` (the paper takes one
step). The inner loop is the core's (:func:`metarl.core.functional.adapt` with per-parameter
tensor learning rates); the learner is :class:`agents.maml.MAML` with ``alpha`` added to the
parameters Adam updates and used wherever the inner loop runs: meta-training, evaluation
(``adaptation_curve``: ``alpha`` at each of the evaluated steps; ``eval.lr`` does not apply) and
``adapt_task`` (:class:`~metarl.app.classifier.FewShotClassifier`).

``alpha`` starts at ``inner.lr`` everywhere (``metasgd.alpha_init: inner_lr``, so the first
meta-step is MAML's) or, as in the paper, uniformly at random in ``metasgd.alpha_range``
([0.005, 0.1]; ``alpha_init: uniform``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from agents.maml import MAML
from metarl.core.functional import Params, params_of
from metarl.core.learner import register


class LearnedLRs(nn.Module):
    """``alpha``: one learning rate per coordinate of each parameter of ``theta`` (same shapes,
    device and dtype), checkpointed with the learner.

    Args:
        params: ``theta`` by name, ``{name: tensor}``.
        init: ``"constant"`` (every entry ``value``) or ``"uniform"`` (drawn in ``[low, high)``
            from torch's global generator, which the run's seed sets).
    """

    def __init__(
        self, params: Params, *, init: str = "constant", value: float = 0.01, low: float = 0.005, high: float = 0.1
    ) -> None:
        super().__init__()
        if init not in ("constant", "uniform"):
            raise ValueError(f"alpha init must be 'constant' or 'uniform', got {init!r}")
        self.names = list(params)
        lrs = []
        for p in params.values():
            p = p.detach()
            alpha = torch.full_like(p, value) if init == "constant" else torch.empty_like(p).uniform_(low, high)
            lrs.append(nn.Parameter(alpha))
        self.lrs = nn.ParameterList(lrs)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{name: alpha_name}`` (the parameters themselves: differentiable)."""
        return dict(zip(self.names, self.lrs, strict=True))


class MetaSGD(MAML):
    """Second-order MAML whose inner learning rates ``alpha`` (one per coordinate) are meta-learned.

    Args:
        model: the meta-model (``theta``).
        objective: a per-task few-shot objective (:class:`metarl.fewshot.objective.FewShotObjective`).
        steps: inner steps in meta-training (each with the same ``alpha``).
        outer_lr: Adam learning rate of ``theta`` and ``alpha``.
        alpha_init / alpha_value / alpha_range: how ``alpha`` starts (see :class:`LearnedLRs`).
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        steps: int = 1,
        outer_lr: float = 1e-3,
        alpha_init: str = "constant",
        alpha_value: float = 0.01,
        alpha_range: tuple[float, float] = (0.005, 0.1),
        batched: bool = True,
    ) -> None:
        if steps < 1:
            raise ValueError(f"metasgd needs at least 1 inner step, got {steps}")
        super().__init__(model, objective, inner_lrs=[alpha_value] * steps, outer_lr=None, batched=batched)
        low, high = alpha_range
        self.alpha = LearnedLRs(params_of(model), init=alpha_init, value=alpha_value, low=low, high=high)
        self.optimizer = torch.optim.Adam([*model.parameters(), *self.alpha.parameters()], lr=outer_lr)

    def step_lrs(self, steps: int, *, detach: bool = False) -> list[dict[str, torch.Tensor]]:
        """The learning rates of ``steps`` inner steps: ``alpha`` (per parameter) at each."""
        alpha = self.alpha.as_dict()
        if detach:
            alpha = {k: v.detach() for k, v in alpha.items()}
        return [alpha] * steps

    def meta_loss(self, params: Params, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean post-adaptation query loss, differentiable in ``params`` and in ``alpha``."""
        lrs = self.step_lrs(len(self.inner_lrs))
        return self.objective.meta_loss(params, batch, lrs=lrs, first_order=self.first_order)

    def adapt(
        self, params: Params, support: Any, *, lrs: Sequence[float] | None = None, first_order: bool | None = None
    ) -> Params:
        """Adapted parameters ``{name: [T, ...]}`` after ``len(lrs)`` steps of ``alpha`` (the values
        of ``lrs`` are not used: ``alpha`` replaces them)."""
        steps = len(self.inner_lrs if lrs is None else lrs)
        return super().adapt(params, support, lrs=self.step_lrs(steps), first_order=first_order)

    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, Any]:
        """Query metrics ``{name: [T, len(lrs) + 1]}`` after 0..len(lrs) steps of ``alpha``."""
        return self.objective.adaptation_curve(self.theta(), tasks, self.step_lrs(len(lrs), detach=True))

    def adapt_task(self, task: Any, lrs: Sequence[float]) -> Params:
        """One task's parameters after ``len(lrs)`` steps of ``alpha``."""
        with torch.no_grad():
            steps = self.step_lrs(len(lrs), detach=True)
            return self.objective.adapt_one(self.theta(), task, lrs=steps, first_order=True)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha.load_state_dict(state["alpha"])
        super().load_state_dict(state)


@register("metasgd", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> MetaSGD:
    lr = cfg.inner.lr if isinstance(cfg.inner.lr, (int, float)) else cfg.inner.lr[0]
    return MetaSGD(
        model,
        objective,
        steps=cfg.inner.steps,
        outer_lr=cfg.outer.lr,
        alpha_init="constant" if cfg.metasgd.alpha_init == "inner_lr" else "uniform",
        alpha_value=float(lr),
        alpha_range=tuple(cfg.metasgd.alpha_range),
        batched=cfg.batched,
    )
