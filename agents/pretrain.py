"""The multi-task pretraining baseline: no inner loop in training, Adam on every task's query loss at ``theta``.

    theta <- Adam(theta, grad_theta mean_i L_query(theta; task i))

Evaluation fine-tunes it with the same inner loop as the meta-learners, which makes it the
baseline that tells what meta-learning adds.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from agents.maml import MAML
from metarl.core.learner import register


class Pretrain(MAML):
    """MAML with zero inner steps in training (the query loss of ``theta`` itself)."""

    def __init__(self, model: nn.Module, objective: Any, **kwargs: Any) -> None:
        kwargs["inner_lrs"] = []
        super().__init__(model, objective, first_order=True, **kwargs)


@register("pretrain", family="fewshot")
def build_pretrain(cfg: Any, model: nn.Module, objective: Any) -> Pretrain:
    return Pretrain(model, objective, inner_lrs=[], outer_lr=cfg.outer.lr, batched=cfg.batched)
