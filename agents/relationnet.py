"""Relation Networks (Sung et al., 2018): a learned relation module scores each (class, query) pair.

    c_n       = sum_k f(x_{n,k})                             (class feature: the sum of its support embeddings)
    r_{q,n}   = g([c_n, f(q)]) in [0, 1]                      (relation score; g ends in a sigmoid)
    L         = mean_{q,n} (r_{q,n} - [y_q = n])^2            (MSE to the one-hot match, as in the paper)
    theta, g <- Adam(grad mean_tasks L);   prediction = argmax_n r_{q,n}

``f`` is the conv-4 backbone of MAML's Omniglot model without its head (the same network as
every other method of the table). The paper's relation module is two conv blocks (3x3 conv,
64 filters, batch norm, ReLU, 2x2 max-pool) on the concatenated 7x7 feature maps, then FC 8
(ReLU) and FC 1 (sigmoid); its embedding pools in only two of its four blocks. Our shared
backbone pools in all four, which leaves a ``filters x 1 x 1`` map at 28x28 input, where a
padded 3x3 convolution sees only its centre tap and a 2x2 pool has nothing to pool. So ``g``
here is an MLP: ``blocks`` fully connected layers of ``filters`` units with batch norm and ReLU
(what the paper's conv blocks compute on a 1x1 map: a 1x1 convolution, without the pooling),
then FC ``hidden`` (ReLU, the paper's 8) and FC 1 (sigmoid). Batch norm uses the statistics of
the task's ``Q x N`` pairs, as the backbone uses those of the task's images. The loss is the
mean rather than the paper's sum over pairs (a constant factor, which Adam's step ignores).
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


class RelationModule(nn.Module):
    """``g``: pairs ``[..., 2D]`` -> relation logits ``[...]`` (the score is their sigmoid)."""

    def __init__(self, dim: int, *, blocks: int = 2, hidden: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 2 * dim
        for _ in range(blocks):
            layers += [nn.Linear(width, dim), nn.BatchNorm1d(dim, track_running_stats=False), nn.ReLU()]
            width = dim
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs.reshape(-1, pairs.shape[-1])).view(pairs.shape[:-1])


def class_sums(support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class features ``[n_way, D]``: the sum of each class's support embeddings ``[S, D]``."""
    return one_hot(support_y, n_way, support.dtype).T @ support


def relation_logits(
    relation: nn.Module, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Relation logits ``[Q, n_way]`` of ``g([c_n, f(q)])`` for query embeddings ``[Q, D]`` and support
    embeddings ``[S, D]`` with labels ``[S]``; the relation scores are their sigmoid."""
    classes = class_sums(support, support_y, n_way)
    q, n, d = len(query), n_way, query.shape[-1]
    pairs = torch.cat([classes.unsqueeze(0).expand(q, n, d), query.unsqueeze(1).expand(q, n, d)], dim=-1)
    return relation(pairs)


class RelationNet(MetricLearner):
    """Relation Networks with an MLP relation module (see the module docstring for why not conv blocks)."""

    def __init__(self, model: nn.Module, *, blocks: int = 2, hidden: int = 8, **kwargs: Any) -> None:
        if blocks < 0 or hidden < 1:
            raise ValueError(f"relation module needs blocks >= 0 and hidden >= 1, got blocks={blocks}, hidden={hidden}")
        super().__init__(model, modules=RelationModule(model.head.in_features, blocks=blocks, hidden=hidden), **kwargs)

    def relation_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Relation logits ``[Q, n_way]`` of one task from backbone ``params``."""
        z = embed(self.model, params, torch.cat([support_x, query_x]))
        return relation_logits(self.modules, z[: len(support_x)], support_y, z[len(support_x) :], self.n_way)

    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Log relation scores ``[Q, n_way]`` (their softmax: the scores normalised over the classes)."""
        return F.logsigmoid(self.relation_logits(params, support_x, support_y, query_x))

    def task_loss(self, params: Params, task: FewShotBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean squared error of the relation scores to the one-hot match; accuracy of their argmax."""
        scores = torch.sigmoid(self.relation_logits(params, task.support_x, task.support_y, task.query_x))
        loss = (scores - one_hot(task.query_y, self.n_way, scores.dtype)).pow(2).mean()
        return loss, {"loss": loss.detach(), "accuracy": (scores.argmax(-1) == task.query_y).float().mean()}


@register("relationnet", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> RelationNet:
    return RelationNet(
        model,
        n_way=cfg.omniglot.n_way,
        blocks=cfg.relationnet.blocks,
        hidden=cfg.relationnet.hidden,
        outer_lr=cfg.outer.lr,
        batched=cfg.batched,
    )
