"""ANIL, Almost No Inner Loop (Raghu et al., 2020, Rapid Learning or Feature Reuse?).

MAML whose inner loop adapts only the network's head; the body is reused as it is:

    theta = (theta_body, theta_head)
    phi_i = (theta_body, theta_head - lr * grad_head L_support(theta_body, theta_head; task i))   (per inner step)
    theta <- Adam(theta, grad_theta mean_i L_query(phi_i; task i))        (body and head, second order)

The outer loop learns everything, second order through the inner loop like MAML; the inner
gradients are taken with respect to the head alone, so the second-order terms are the head's
(cheap). The head is the ConvNet's ``head`` (its linear classifier) or, for a model without one
(the sinusoid MLP), its last linear layer. Everything else (the objective, vmap or the per-task
loop, evaluation, ``adapt_task`` / ``task_outputs``) is MAML's, with the head-only inner loop.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from agents.maml import MAML
from metarl.core.functional import inner_lrs, params_of
from metarl.core.learner import register


def head_names(model: nn.Module) -> list[str]:
    """Names of the head's parameters: ``model.head``'s if it has one, else the last ``nn.Linear``'s
    (the model itself when it is one linear layer)."""
    head = getattr(model, "head", None)
    prefix = "head"
    if not isinstance(head, nn.Module):
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"ANIL needs a head: {type(model).__name__} has no `head` module and no nn.Linear layer")
        prefix, head = linears[-1]
    names = [name for name, _ in head.named_parameters(prefix=prefix)]
    trainable = params_of(model)
    return [name for name in names if name in trainable]


class ANIL(MAML):
    """MAML with a head-only inner loop (second order unless ``first_order``)."""

    def __init__(self, model: nn.Module, objective: Any, **kwargs: Any) -> None:
        self.head = head_names(model)
        super().__init__(model, objective, adapted=self.head, **kwargs)


@register("anil", family="fewshot")
def build_anil(cfg: Any, model: nn.Module, objective: Any) -> ANIL:
    return ANIL(
        model, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps), outer_lr=cfg.outer.lr, batched=cfg.batched
    )
