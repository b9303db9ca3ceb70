"""Siamese Neural Networks for one-shot recognition (Koch et al., 2015): a learned verifier of image pairs.

    p(same | x1, x2) = sigmoid( w . |f(x1) - f(x2)| + b )           (weighted component-wise L1 distance)
    L  = sum_{q,i} omega_{q,i} BCE( p(same | q, x_i), [y_q = y_i] )  (every query-support pair of a task)
    omega_{q,i} = 1 / (2 P) for the P same-class pairs, 1 / (2 M) for the M different-class pairs
    theta, w, b <- Adam(grad mean_tasks L)
    prediction  = argmax_n mean_{i: y_i = n} p(same | q, x_i)       (one-shot: the best-matching support image)

``f`` is the twin embedding: the conv-4 backbone of MAML's Omniglot model without its head (the
same network as every other method of the table; the paper's twin is a larger conv net with a
4096-unit sigmoid layer). The paper trains on verification pairs drawn from the background
alphabets; here the pairs are all query-support pairs of each training task, so a task of N
ways gives ``N - 1`` different-class pairs for every same-class one. The weights ``omega`` make
the two kinds count equally (each kind's mean BCE, halved and summed), so the verifier is not
pushed towards "different". The paper's per-layer L2 penalties and momentum schedule are replaced
by the table's common Adam.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metarl.core.functional import Params
from metarl.core.learner import register
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.metric import MetricLearner, embed, one_hot


def pair_logits(head: nn.Linear, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Verification logits ``[Q, S]``, ``w . |f(q) - f(x_i)| + b``, of query embeddings ``[Q, D]``
    against support embeddings ``[S, D]``; ``p(same)`` is their sigmoid."""
    return head((query.unsqueeze(1) - support.unsqueeze(0)).abs()).squeeze(-1)


def pair_weights(query_y: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
    """Weights ``[Q, S]`` of the pairs' BCE terms: the same-class pairs share one half, the others the other half."""
    same = (query_y.unsqueeze(1) == support_y.unsqueeze(0)).float()
    return same / (2 * same.sum()) + (1 - same) / (2 * (1 - same).sum())


def class_log_scores(logits: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """``log mean_{i in class n} p(same | q, x_i)`` ``[Q, n_way]`` of verification logits ``[Q, S]``."""
    member = one_hot(support_y, n_way, logits.dtype).T  # [n_way, S]
    log_p = F.logsigmoid(logits).unsqueeze(1)  # [Q, 1, S]
    masked = log_p.masked_fill(member == 0, float("-inf"))
    return torch.logsumexp(masked, dim=-1) - member.sum(-1).log()


class Siamese(MetricLearner):
    """Siamese verification network; a query takes the class whose support images it matches best."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, modules=nn.Linear(model.head.in_features, 1), **kwargs)

    def pair_logits(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Verification logits ``[Q, S]`` of one task's query-support pairs from backbone ``params``."""
        z = embed(self.model, params, torch.cat([support_x, query_x]))
        return pair_logits(self.modules, z[: len(support_x)], z[len(support_x) :])

    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Log mean verification score of each class ``[Q, n_way]`` (softmax: the scores normalised)."""
        return class_log_scores(self.pair_logits(params, support_x, query_x), support_y, self.n_way)

    def task_loss(self, params: Params, task: FewShotBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The class-balanced binary cross-entropy of all query-support pairs; accuracy of the class scores."""
        logits = self.pair_logits(params, task.support_x, task.query_x)
        same = (task.query_y.unsqueeze(1) == task.support_y.unsqueeze(0)).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, same, reduction="none")
        loss = (pair_weights(task.query_y, task.support_y) * bce).sum()
        predicted = class_log_scores(logits, task.support_y, self.n_way).argmax(-1)
        return loss, {"loss": loss.detach(), "accuracy": (predicted == task.query_y).float().mean()}


@register("siamese", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> Siamese:
    return Siamese(model, n_way=cfg.omniglot.n_way, outer_lr=cfg.outer.lr, batched=cfg.batched)
