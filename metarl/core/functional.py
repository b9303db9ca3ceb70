"""Functional parameters and the inner loop shared by every meta-learner.

A model is never mutated by adaptation: it is called with an explicit parameter dict
(``torch.func.functional_call``) and each inner step returns a *new* dict. Gradients are taken
with ``torch.func.grad``, so the same code runs for one task, inside ``torch.func.vmap`` over the
tasks of a meta-batch, and under an outer ``torch.autograd`` graph (second-order MAML).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad

Params = dict[str, torch.Tensor]
# loss(params, step) -> scalar tensor; `step` lets a caller use fresh data for each inner step.
StepLoss = Callable[[Params, int], torch.Tensor]
# The learning rate of one inner step: one number for every parameter, or a tensor per parameter
# (broadcast against it; Meta-SGD's learned per-coordinate learning rates).
LR = float | Mapping[str, torch.Tensor]


def params_of(module: nn.Module) -> Params:
    """The module's own trainable parameters, by name (the tensors themselves, not copies)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def call(module: nn.Module, params: Mapping[str, torch.Tensor], *args, **kwargs):
    """Run ``module`` with ``params`` in place of its parameters (buffers stay the module's)."""
    return functional_call(module, dict(params), args, kwargs)


def inner_lrs(lr: float | Sequence[float], steps: int) -> list[float]:
    """Per-step learning rates: a float for every step, or a list whose last entry repeats.

    >>> inner_lrs(0.1, 3)
    [0.1, 0.1, 0.1]
    >>> inner_lrs([0.4, 0.1], 3)
    [0.4, 0.1, 0.1]
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    if isinstance(lr, (int, float)):
        return [float(lr)] * steps
    lrs = [float(x) for x in lr]
    if not lrs:
        raise ValueError("inner learning-rate list is empty; give a float or one value per step")
    return [lrs[min(i, len(lrs) - 1)] for i in range(steps)]


def sgd_step(params: Params, grads: Mapping[str, torch.Tensor], lr: LR) -> Params:
    """One gradient step: a new dict ``{name: p - lr * g}``; ``lr`` a number, or a dict of
    tensors ``{name: lr_name}`` (each broadcast against its parameter: ``p - lr[name] * g``)."""
    if isinstance(lr, Mapping):
        return {name: p - lr[name] * grads[name] for name, p in params.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


def adapt(
    loss: StepLoss,
    params: Params,
    *,
    lrs: Sequence[LR],
    first_order: bool = False,
) -> Params:
    """Take ``len(lrs)`` gradient steps on ``loss`` from ``params`` and return the adapted dict.

    Each entry of ``lrs`` is one step's learning rate: a number, or per-parameter tensors
    ``{name: lr}`` (see :func:`sgd_step`), which stay in the outer graph (their gradient is taken
    through the adapted parameters, as for Meta-SGD's learned learning rates).

    With ``first_order=False`` the result stays differentiable through every step (MAML's
    second-order meta-gradient). With ``first_order=True`` each step's gradient is treated as a
    constant, so ``d phi / d theta`` is the identity (FOMAML, and Reptile's inner loop).
    Works unbatched, inside ``torch.func.vmap``, and under ``torch.no_grad`` (the inner
    gradients are still taken; only the outer graph is skipped).
    """
    params = dict(params)  # a new dict even for zero steps
    for step, lr in enumerate(lrs):
        grads = grad(loss)(params, step)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        params = sgd_step(params, grads, lr)
    return params
