"""Functional parameters and the inner loop shared by every meta-learner.

A model is never mutated by adaptation: it is called with an explicit parameter dict
(``torch.func.functional_call``) and each inner step returns a *new* dict. Gradients are taken
with ``torch.func.grad``, so the same code runs for one task, inside ``torch.func.vmap`` over the
tasks of a meta-batch, and under an outer ``torch.autograd`` graph (second-order MAML).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad

Params = dict[str, torch.Tensor]
# loss(params, step) -> scalar tensor; `step` lets a caller use fresh data for each inner step.
StepLoss = Callable[[Params, int], torch.Tensor]


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


#: An inner step's learning rate: one for every parameter, or one per parameter name: a float, a
#: 0-dim tensor (MAML++'s learned per-layer rates) or a tensor of the parameter's shape (Meta-SGD's
#: per-coordinate rates), broadcast against the parameter.
StepLR = float | torch.Tensor | Mapping[str, float | torch.Tensor]


def sgd_step(params: Params, grads: Mapping[str, torch.Tensor], lr: StepLR) -> Params:
    """One gradient step: a new dict ``{name: p - lr * g}`` (``lr[name]`` for a per-name mapping).

    Entries without a gradient in ``grads`` are carried over unchanged.
    """
    out = dict(params)
    for name, g in grads.items():
        out[name] = params[name] - (lr[name] if isinstance(lr, Mapping) else lr) * g
    return out


def adapt(
    loss: StepLoss,
    params: Params,
    *,
    lrs: Sequence[StepLR],
    first_order: bool = False,
    adapted: Collection[str] | None = None,
) -> Params:
    """Take ``len(lrs)`` gradient steps on ``loss`` from ``params`` and return the adapted dict.

    Each entry of ``lrs`` is one step's learning rate: a number, or per-parameter tensors
    ``{name: lr}`` (see :func:`sgd_step`), which stay in the outer graph (their gradient is taken
    through the adapted parameters, as for Meta-SGD's learned learning rates).

    With ``first_order=False`` the result stays differentiable through every step (MAML's
    second-order meta-gradient). With ``first_order=True`` each step's gradient is treated as a
    constant, so ``d phi / d theta`` is the identity (FOMAML, and Reptile's inner loop).
    ``adapted`` names the entries that the steps move (None: all); the others are held fixed
    (still in the outer graph) and no inner gradient is taken for them (ANIL's head-only loop).
    Works unbatched, inside ``torch.func.vmap``, and under ``torch.no_grad`` (the inner
    gradients are still taken; only the outer graph is skipped).
    """
    params = dict(params)  # a new dict even for zero steps
    names = list(params) if adapted is None else [n for n in params if n in adapted]
    for step, lr in enumerate(lrs):
        fixed = {n: v for n, v in params.items() if n not in names}

        def moved_loss(moved: Params, step: int, fixed: Params = fixed) -> torch.Tensor:
            return loss({**fixed, **moved}, step)

        grads = grad(moved_loss)({n: params[n] for n in names}, step)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        params = sgd_step(params, grads, lr)
    return params
