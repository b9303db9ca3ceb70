"""Reptile (Nichol et al., 2018), for both families: move ``theta`` toward the weights k inner steps reach.

    phi_i  = k first-order inner steps from theta on task i
    theta <- theta + epsilon * mean_i (phi_i - theta)

``epsilon`` (the outer step size) is annealed linearly from ``epsilon_start`` at iteration 0 to
``epsilon_end`` at ``num_iterations``. No query loss is differentiated: the query metrics of a
few-shot task are only logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from agents.maml import means
from metarl.core.functional import inner_lrs, params_of
from metarl.core.learner import Learner, register
from metarl.core.metalearning import batch_objective, linear_anneal


class Reptile(Learner):
    """Reptile with a linearly annealed outer step size ``epsilon``."""

    uses_query = False  # the validation episodes of an RL batch are only logged

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        inner_lrs: Sequence[float],
        epsilon_start: float,
        epsilon_end: float,
        num_iterations: int,
        batched: bool = True,
    ) -> None:
        self.model = model
        self.objective = batch_objective(objective, batched=batched)
        self.inner_lrs = list(inner_lrs)
        self.first_order = True
        self.epsilon_start = epsilon_start
        self.epsilon_end = epsilon_end
        self.num_iterations = num_iterations

    def epsilon(self, iteration: int) -> float:
        return linear_anneal(self.epsilon_start, self.epsilon_end, iteration, self.num_iterations)

    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        theta = self.theta()
        with torch.no_grad():
            phis, metrics = self.objective.adapt_with_metrics(theta, batch, lrs=self.inner_lrs)
            eps = self.epsilon(iteration)
            for name, p in params_of(self.model).items():
                p.add_(eps * (phis[name].mean(0) - theta[name]))
        return {**means(metrics), "epsilon": eps}


def _reptile_kwargs(cfg: Any) -> dict[str, Any]:
    return dict(
        inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps),
        epsilon_start=cfg.outer.epsilon_start,
        epsilon_end=cfg.outer.epsilon_end,
        num_iterations=cfg.num_iterations,
    )


@register("reptile", family="fewshot")
def build_reptile(cfg: Any, model: nn.Module, objective: Any) -> Reptile:
    return Reptile(model, objective, batched=cfg.batched, **_reptile_kwargs(cfg))


@register("reptile", family="rl")
def build_reptile_policy(cfg: Any, policy: nn.Module, objective: Any) -> Reptile:
    return Reptile(policy, objective, **_reptile_kwargs(cfg))  # the RL objective batches the tasks itself
