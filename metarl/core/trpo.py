"""The numerical pieces of a TRPO outer step (MAML-TRPO's meta-update).

MAML-TRPO does not apply the meta-gradient ``g`` directly. It takes the natural-gradient
direction ``x = F^-1 g``, where ``F`` is the Hessian of the mean KL divergence between the
post-adaptation policies before and after the update (the Fisher matrix at the current
parameters), and then keeps the step inside a KL trust region:

1. ``make_hvp`` builds ``v -> F v + damping * v`` from the KL by double back-propagation, so
   ``F`` is never formed;
2. ``conjugate_gradient`` solves ``F x = g`` with a few of those products;
3. ``trpo_step_size`` scales ``x`` so that the quadratic KL estimate
   ``0.5 * (beta x)^T F (beta x)`` equals ``max_kl``;
4. ``line_search`` backtracks from the full step ``beta x`` until the surrogate loss improves
   and the measured KL is within ``max_kl``.

Every function works on flat 1-D vectors; ``flatten``/``unflatten`` convert to and from the
parameter dicts of ``metarl.core.functional``. Nothing here knows a policy, an env or a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from metarl.core.functional import Params

__all__ = [
    "LineSearchResult",
    "conjugate_gradient",
    "flatten",
    "line_search",
    "make_hvp",
    "trpo_step_size",
    "unflatten",
]


# ------------------------------------------------------------------------------------------
# Parameter dicts <-> flat vectors
# ------------------------------------------------------------------------------------------


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """All tensors of ``params`` as one 1-D vector, in dict order (differentiable).

    An empty dict gives an empty float vector.
    """
    if not params:
        return torch.zeros(0)
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a 1-D ``vector`` into a dict with the names and shapes of ``like``.

    The inverse of ``flatten``: ``unflatten(flatten(p), p)`` equals ``p``. The pieces are views
    of ``vector`` (differentiable), in ``vector``'s dtype and device.
    """
    if vector.dim() != 1:
        raise ValueError(f"unflatten expects a 1-D vector, got shape {tuple(vector.shape)}")
    sizes = [p.numel() for p in like.values()]
    expected = sum(sizes)
    if vector.numel() != expected:
        raise ValueError(
            f"vector has {vector.numel()} elements but the parameters in `like` hold "
            f"{expected} ({len(sizes)} tensors); the two sizes must match"
        )
    pieces = torch.split(vector, sizes) if sizes else ()
    return {name: piece.view(p.shape) for (name, p), piece in zip(like.items(), pieces)}


# ------------------------------------------------------------------------------------------
# Solving F x = g
# ------------------------------------------------------------------------------------------


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    iterations: int = 10,
    residual_tol: float = 1e-10,
) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A``, given only ``A v``.

    Starts from ``x = 0`` (so the first residual is ``r = b``) and runs at most ``iterations``
    conjugate-gradient steps, one ``matvec`` call each:

        alpha = r.r / p.Ap;  x += alpha p;  r -= alpha Ap;  p = r + (r_new.r_new / r.r) p

    It stops as soon as ``r.r < residual_tol``; the residual is checked before every ``matvec``,
    so ``b = 0`` returns zeros without calling ``matvec`` and ``A = I`` needs exactly one call.
    In exact arithmetic an ``n x n`` system is solved in at most ``n`` steps.

    Runs under ``torch.no_grad`` on a detached ``b``; the result carries no graph. Raises
    ``ValueError`` if ``p.Ap`` is not positive and finite (``A`` is not positive definite along
    ``p``; add damping).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not residual_tol >= 0:
        raise ValueError(f"residual_tol must be >= 0, got {residual_tol}")
    with torch.no_grad():
        b = b.detach()
        x = torch.zeros_like(b)
        r = b.clone()
        p = b.clone()
        r_dot_r = torch.sum(r * r)
        for _ in range(iterations):
            if r_dot_r.item() < residual_tol or r_dot_r.item() == 0:
                break  # converged (an exact zero residual also stops when residual_tol = 0)
            a_p = matvec(p).detach()
            p_dot_ap = torch.sum(p * a_p)
            if not (math.isfinite(p_dot_ap.item()) and p_dot_ap.item() > 0):
                raise ValueError(
                    f"conjugate_gradient needs a positive-definite operator, but p.Ap = "
                    f"{p_dot_ap.item():.6g} (must be finite and > 0); increase the damping"
                )
            alpha = r_dot_r / p_dot_ap
            x += alpha * p
            r -= alpha * a_p
            new_r_dot_r = torch.sum(r * r)
            p = r + (new_r_dot_r / r_dot_r) * p
            r_dot_r = new_r_dot_r
    return x


def make_hvp(
    scalar_fn: Callable[[Params], Tensor],
    params: Params,
    *,
    damping: float,
) -> Callable[[Tensor], Tensor]:
    """The damped Hessian-vector product ``v -> H v + damping * v`` of ``scalar_fn`` at ``params``.

    ``H`` is the Hessian of ``scalar_fn(params)`` with respect to the flattened ``params`` (for
    TRPO: ``scalar_fn`` is the mean KL to the old policy, and ``H`` at the old parameters is the
    Fisher matrix). The gradient ``g`` is built once with ``create_graph=True``; each call then
    differentiates ``g . v`` again through the retained graph, so ``H`` is never formed.

    ``params`` must be leaf tensors with ``requires_grad=True``; ``v`` is a flat vector in
    ``flatten(params)`` order. Parameters that ``scalar_fn`` does not touch get zero rows. The
    product is returned detached, and the returned function also works under ``torch.no_grad``
    (as inside ``conjugate_gradient``).
    """
    if not damping >= 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad; make_hvp needs leaves with requires_grad=True")
    tensors = list(params.values())
    size = sum(p.numel() for p in tensors)
    with torch.enable_grad():
        value = scalar_fn(params)
        if value.numel() != 1:
            raise ValueError(f"scalar_fn must return a scalar, got shape {tuple(value.shape)}")
        grads = torch.autograd.grad(value, tensors, create_graph=True, materialize_grads=True)
        flat_grad = flatten(dict(zip(params, grads)))

    def hvp(v: Tensor) -> Tensor:
        if v.shape != (size,):
            raise ValueError(f"hvp expects a vector of {size} elements, got shape {tuple(v.shape)}")
        v = v.detach()
        if flat_grad.requires_grad:
            with torch.enable_grad():
                grad_dot_v = torch.dot(flat_grad, v.to(flat_grad.dtype))
                hv = torch.autograd.grad(grad_dot_v, tensors, retain_graph=True, materialize_grads=True)
            product = flatten(dict(zip(params, hv))).detach()
        else:  # scalar_fn is linear in params: H = 0
            product = torch.zeros_like(v)
        return product + damping * v

    return hvp


# ------------------------------------------------------------------------------------------
# Trust region: step size and backtracking
# ------------------------------------------------------------------------------------------


def trpo_step_size(direction: Tensor, fvp_direction: Tensor, max_kl: float) -> Tensor:
    """The scalar ``beta = sqrt(2 * max_kl / (d^T F d))`` for direction ``d``.

    With ``fvp_direction = F d``, the quadratic KL estimate of the step ``beta * d`` is
    ``0.5 * beta^2 * d^T F d = max_kl``. Returns a 0-dim tensor without a graph. Raises
    ``ValueError`` if ``d^T F d`` is not finite and positive (a zero direction, or an ``F``
    that is not positive definite along ``d``).
    """
    if not (max_kl > 0 and math.isfinite(max_kl)):
        raise ValueError(f"max_kl must be finite and > 0, got {max_kl}")
    if direction.shape != fvp_direction.shape:
        raise ValueError(
            f"direction has shape {tuple(direction.shape)} but fvp_direction has "
            f"{tuple(fvp_direction.shape)}; they must match"
        )
    with torch.no_grad():
        curvature = torch.sum(direction.detach() * fvp_direction.detach())
        if not (math.isfinite(curvature.item()) and curvature.item() > 0):
            raise ValueError(
                f"d^T F d = {curvature.item():.6g}; it must be finite and > 0 to scale the step "
                f"to the trust region (zero direction, or F not positive definite along it)"
            )
        return torch.sqrt(2.0 * max_kl / curvature)


class LineSearchResult(NamedTuple):
    """The outcome of ``line_search``."""

    accepted: bool
    """Whether some fraction of the full step was accepted."""
    step: Tensor
    """The accepted step ``fraction * full_step``; zeros if none was accepted."""
    fraction: float
    """The accepted fraction ``ratio**k``; 0.0 if none was accepted."""
    steps_taken: int
    """How many times ``evaluate`` was called."""
    loss: float
    """The loss at the accepted point, or ``loss_before`` if none was accepted."""
    kl: float
    """The KL at the accepted point, or 0.0 if none was accepted."""


def line_search(
    evaluate: Callable[[Tensor], tuple[float, float]],
    full_step: Tensor,
    *,
    loss_before: float,
    max_kl: float,
    ratio: float = 0.8,
    max_steps: int = 15,
) -> LineSearchResult:
    """Backtrack along ``full_step`` until the loss improves inside the trust region.

    Tries the fractions ``ratio**0, ratio**1, ..., ratio**(max_steps - 1)`` in turn. For each,
    ``evaluate(fraction * full_step)`` returns ``(new_loss, kl)`` for the parameters
    ``theta + step`` (the caller applies the step). The first fraction with

        new_loss < loss_before  and  kl <= max_kl  and  both finite

    is accepted (strict improvement: the surrogate loss is minimised). If none qualifies the
    result has ``accepted=False`` and a zero step, and the caller keeps ``theta``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in the open interval (0, 1), got {ratio}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if not (max_kl > 0 and math.isfinite(max_kl)):
        raise ValueError(f"max_kl must be finite and > 0, got {max_kl}")
    full_step = full_step.detach()
    for k in range(max_steps):
        fraction = ratio**k
        step = fraction * full_step
        new_loss, kl = evaluate(step)
        new_loss, kl = float(new_loss), float(kl)
        finite = math.isfinite(new_loss) and math.isfinite(kl)
        if finite and new_loss < loss_before and kl <= max_kl:
            return LineSearchResult(True, step, fraction, k + 1, new_loss, kl)
    return LineSearchResult(False, torch.zeros_like(full_step), 0.0, max_steps, float(loss_before), 0.0)
