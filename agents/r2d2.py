"""R2-D2 (Bertinetto, Henriques, Torr and Vedaldi, 2019): a differentiable closed-form ridge-regression head.

For each task, the support images' embeddings ``X [N*K, D]`` (the conv-4 backbone, flattened)
and one-hot labels ``Y [N*K, N]`` define a ridge regression solved in closed form, through the
Woodbury identity because ``N*K`` is at most ``D`` in the few-shot regime (an ``N*K x N*K``
system instead of ``D x D``):

    W       = X^T (X X^T + lambda I)^-1 Y                   ([D, N]; = (X^T X + lambda I)^-1 X^T Y)
    logits  = alpha * f(query) W + beta                     ([Q, N])
    theta, lambda, alpha, beta <- Adam(grad mean_tasks CE(logits, y_query))

The solve (``torch.linalg.solve``) is differentiable, so the query loss trains the backbone
through the base learner, and also the base learner's own hyper-parameters: ``lambda`` (kept
positive as ``exp`` of a learned log), and the scale ``alpha`` and offset ``beta`` that calibrate
the regression outputs for the cross-entropy. A scalar ``beta`` adds the same amount to every
class's logit, which the softmax ignores: its gradient is zero under this multi-class loss (it
matters for the paper's binary logistic variant, LR-D2), and it is kept as the paper writes it.

Differences from the paper: the backbone is the lab's conv-4 (64 filters, D = 64 at 28x28)
instead of the paper's wider 4-block net with concatenated 3rd/4th-block features; training
tasks have the evaluation shape instead of the paper's 60-way episodes. The authors' code also
appends a constant feature (a per-class bias in W) and scales X and Y by 1/sqrt(N*K); the
formula here is the paper's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from metarl.core.functional import Params
from metarl.core.learner import register
from metarl.fewshot.metric import MetricLearner, embed


def ridge_weights(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ridge regression weights ``W [D, C]`` of features ``x [M, D]`` and targets ``y [M, C]``,
    ``X^T (X X^T + lam I)^-1 Y`` (the Woodbury form: one ``M x M`` solve)."""
    gram = x @ x.T + lam * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return x.T @ torch.linalg.solve(gram, y)


def one_hot(labels: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    """``[M, n_way]`` one-hot targets of labels ``[M]`` in ``0..n_way-1`` (written to run under vmap)."""
    return (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(dtype)


class RidgeHead(nn.Module):
    """The base learner's learned scalars: ``log_lambda``, ``alpha`` and ``beta``."""

    def __init__(self, init_lambda: float = 1.0, init_alpha: float = 1.0, init_beta: float = 0.0) -> None:
        super().__init__()
        if init_lambda <= 0:
            raise ValueError(f"r2d2 init_lambda must be > 0, got {init_lambda}")
        self.log_lambda = nn.Parameter(torch.tensor(math.log(init_lambda)))
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.beta = nn.Parameter(torch.tensor(float(init_beta)))

    @property
    def lam(self) -> torch.Tensor:
        return self.log_lambda.exp()


class R2D2(MetricLearner):
    """R2-D2: a ridge-regression head solved per task on the backbone's support embeddings.

    Args:
        model: the backbone, a :class:`agents.models.ConvNet` (its conv blocks embed; no head used).
        n_way: classes per task.
        init_lambda, init_alpha, init_beta: initial values of the learned ``lambda``, ``alpha``, ``beta``.
        outer_lr: Adam learning rate of the backbone and of the head's scalars.
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_way: int,
        init_lambda: float = 1.0,
        init_alpha: float = 1.0,
        init_beta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, n_way=n_way, modules=RidgeHead(init_lambda, init_alpha, init_beta), **kwargs)

    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """``alpha * f(query) W + beta`` ``[Q, n_way]``, with ``W`` the ridge solution on the support set."""
        z = embed(self.model, params, torch.cat([support_x, query_x]))
        support, query = z[: len(support_x)], z[len(support_x) :]
        w = ridge_weights(support, one_hot(support_y, self.n_way, z.dtype), self.modules.lam)
        return self.modules.alpha * (query @ w) + self.modules.beta

    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        metrics = super().step(batch, iteration)
        head = self.modules
        return {
            **metrics,
            "lambda": float(head.lam.detach()),
            "alpha": float(head.alpha.detach()),
            "beta": float(head.beta.detach()),
        }


@register("r2d2", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> R2D2:
    c = cfg.r2d2
    return R2D2(
        model,
        n_way=cfg.omniglot.n_way,
        init_lambda=c.init_lambda,
        init_alpha=c.init_alpha,
        init_beta=c.init_beta,
        outer_lr=cfg.outer.lr,
        batched=cfg.batched,
    )
