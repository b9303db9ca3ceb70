"""Prototypical Networks (Snell et al., 2017): a query belongs to the class of the nearest prototype.

    c_n       = mean_k f(x_{n,k})                        (prototype of class n: its support embeddings' mean)
    p(n | q)  = softmax_n( -d(f(q), c_n) )             (d: squared Euclidean distance, or negative cosine)
    theta    <- Adam(theta, grad mean_tasks CE(p, y_q))

``f`` is the conv-4 backbone of MAML's Omniglot model without its head (the same network as
every other method of the table). Training and evaluation tasks may have different shots
(``data.k_shot`` / ``eval.k_shot``), as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metarl.core.functional import Params
from metarl.core.learner import register
from metarl.fewshot.metric import MetricLearner, class_means, embed


def prototype_logits(support: torch.Tensor, query: torch.Tensor, n_way: int, distance: str) -> torch.Tensor:
    """Scores ``[Q, n_way]``: minus the squared Euclidean distance (or the cosine similarity) of each
    query embedding ``[Q, D]`` to each class mean of the class-major support embeddings ``[n_way * K, D]``."""
    prototypes = class_means(support, n_way)
    if distance == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(MetricLearner):
    """Prototypical Networks with a squared-Euclidean (the paper's) or cosine distance."""

    def __init__(self, model: nn.Module, *, distance: str = "euclidean", **kwargs: Any) -> None:
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        super().__init__(model, **kwargs)
        self.distance = distance

    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        z = embed(self.model, params, torch.cat([support_x, query_x]))
        return prototype_logits(z[: len(support_x)], z[len(support_x) :], self.n_way, self.distance)


@register("protonet", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> ProtoNet:
    return ProtoNet(
        model,
        n_way=cfg.omniglot.n_way,
        distance=cfg.protonet.distance,
        outer_lr=cfg.outer.lr,
        batched=cfg.batched,
    )
