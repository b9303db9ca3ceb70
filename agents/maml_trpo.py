"""MAML-TRPO (Finn et al., 2017; second order) and FOMAML-TRPO: MAML whose outer step is a trust region.

The inner loop and the surrogate are the RL objective's (:mod:`metarl.rl.objective`). The outer
objective, on validation episodes ``V_i`` sampled with ``phi_i(theta_old)``::

    surrogate(theta) = mean_i  - mean_V_i[ exp(log pi_{phi_i(theta)}(a|s) - log pi_old(a|s)) * A_t ]
    kl(theta)        = mean_i  mean_V_i[ KL(pi_{phi_i(theta_old)} || pi_{phi_i(theta)}) ]

(``mean_V_i``: the task mean over the validation steps, per step or per episode as configured:
:func:`metarl.rl.objective.task_mean`)

minimised with a trust region ``kl <= max_kl``: ``g = grad surrogate`` through the inner loop,
``x = F^-1 g`` by conjugate gradient with Fisher-vector products ``F v``, step ``-beta x`` with
``beta = sqrt(2 max_kl / x^T F x)``, backtracking line search.

Fisher-vector products: ``F`` is the Hessian of ``kl`` at ``theta_old``. Because ``KL(old||new)``
and its gradient vanish at ``new = old``, that Hessian is exactly ``J^T M J``, where ``J`` is the
Jacobian of the policy's distribution parameters (mean and log-std for every validation step)
with respect to ``theta``, through the inner loop, and ``M`` the Hessian of the KL in those
parameters (diagonal for Gaussians). :meth:`MAMLTRPO.fisher_vector_product` computes
``J^T (M (J v))`` with two backward passes through graphs built once per meta-update, instead of
differentiating the gradient of the KL again; the tests check it equals the plain Hessian-vector
product of the KL. ``fvp_subsample < 1`` uses the first fraction of each task's episodes for the
products, as TRPO implementations commonly do (OpenAI baselines' TRPO uses every 5th sample):
an approximation of ``F``, not the reference's full-batch product (``fvp_subsample = 1``). The
gradient, the step-size check and the line search always use the whole batch and the exact KL.

The TRPO numerics (conjugate gradient, step size, line search) are :mod:`metarl.core.trpo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from agents.maml import MAML
from metarl.core.functional import Params, adapt, inner_lrs
from metarl.core.learner import register
from metarl.core.trpo import conjugate_gradient, flatten, line_search, trpo_step_size, unflatten
from metarl.rl.objective import (
    PolicyGradientObjective,
    RLBatch,
    StepData,
    expand_to_tasks,
    surrogate_of,
)


class MAMLTRPO(MAML):
    """MAML with a TRPO meta-update (``first_order=True``: FOMAML with the same TRPO step).

    Args:
        policy: the meta-policy (its parameters are ``theta``; updated in place by :meth:`step`).
        inner_lrs: inner learning rate of each inner step.
        first_order: drop the second-order terms of the inner loop (FOMAML).
        max_kl, cg_iterations, cg_damping, line_search_steps, line_search_ratio: TRPO settings.
        fvp_subsample: fraction of each task's validation episodes used for Fisher-vector products.
    """

    def __init__(
        self,
        policy: nn.Module,
        objective: PolicyGradientObjective | None = None,
        *,
        inner_lrs: Sequence[float],
        first_order: bool = False,
        max_kl: float = 0.01,
        cg_iterations: int = 10,
        cg_damping: float = 1e-5,
        line_search_steps: int = 15,
        line_search_ratio: float = 0.8,
        fvp_subsample: float = 1.0,
    ) -> None:
        if not 0 < fvp_subsample <= 1:
            raise ValueError(f"fvp_subsample must be in (0, 1], got {fvp_subsample}")
        super().__init__(
            policy,
            objective or PolicyGradientObjective(policy),
            inner_lrs=inner_lrs,
            outer_lr=None,
            first_order=first_order,
        )
        self.policy = policy
        self.max_kl = max_kl
        self.cg_iterations = cg_iterations
        self.cg_damping = cg_damping
        self.line_search_steps = line_search_steps
        self.line_search_ratio = line_search_ratio
        self.fvp_subsample = fvp_subsample

    # -- objective ---------------------------------------------------------------------------
    def surrogate_and_kl(
        self, theta: Params, train: Sequence[StepData], valid: StepData, old_outputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outer surrogate loss and mean KL to the old adapted policies, both scalars."""
        phi = self.adapt(theta, train)
        eps = valid.episodes
        dist = self.policy.distribution(self.policy.outputs(eps.observations, phi))
        kl = torch.distributions.kl_divergence(self.policy.distribution(old_outputs), dist)
        return surrogate_of(dist, valid), valid.mean(kl).mean()

    def old_outputs(self, theta: Params, train: Sequence[StepData], valid: StepData) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            phi = self.adapt(theta, train, first_order=True)
            return tuple(o.detach() for o in self.policy.outputs(valid.episodes.observations, phi))

    def fisher_vector_product(self, theta: Params, train: Sequence[StepData], valid: StepData):
        """``v -> F v + damping v`` at ``theta`` (flat vectors), ``F = J^T M J`` (see module doc).

        The graph of ``J^T u`` (``u`` a dummy cotangent) is built once; each product then takes
        ``J v`` as the derivative of ``J^T u`` in ``u`` (a backward pass through that graph) and
        ``J^T (M J v)`` by a backward pass through the outputs' graph.

        With ``fvp_subsample < 1`` the products use the first fraction of every task's episodes:
        validation steps for ``J`` and ``M``, and inner-step episodes for the inner loop's
        Jacobian, evaluated at the adapted parameters of the full batch.
        """
        f = self.fvp_subsample
        valid_sub = valid.head(f)
        eps = valid_sub.episodes
        weights = valid_sub.step_weights() / eps.num_tasks
        with torch.enable_grad():
            th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
            if f < 1 and not self.first_order:
                phi = self._adapt_subsampled_jacobian(th, train, f)
            else:
                phi = self.adapt(th, train)
            out = self.policy.outputs(eps.observations, phi)
            dummy = tuple(torch.zeros_like(o, requires_grad=True) for o in out)
            jt_u = torch.autograd.grad(out, list(th.values()), grad_outputs=dummy, create_graph=True)
        old = tuple(o.detach() for o in out)
        damping = self.cg_damping
        names = list(th)

        def fvp(v: torch.Tensor) -> torch.Tensor:
            tangent = unflatten(v, theta)
            jv = torch.autograd.grad(jt_u, dummy, grad_outputs=[tangent[k] for k in names], retain_graph=True)
            m_jv = self.policy.kl_hessian_product(old, jv, weights)
            grads = torch.autograd.grad(out, list(th.values()), grad_outputs=m_jv, retain_graph=True)
            return torch.cat([g.reshape(-1) for g in grads]) + damping * v

        return fvp

    def _adapt_subsampled_jacobian(self, theta: Params, train: Sequence[StepData], fraction: float) -> Params:
        """Adapted parameters whose value is the full batch's and whose derivative in ``theta``
        is that of the inner loop run on the first ``fraction`` of each task's episodes."""
        with torch.no_grad():
            full = self.adapt({k: v.detach() for k, v in theta.items()}, train, first_order=True)
        params = expand_to_tasks(theta, train[0].episodes.num_tasks)
        for s, data in enumerate(train):
            sub = data.head(fraction)
            step = adapt(lambda p, _step, sub=sub: self.objective.support_loss(p, sub), params, lrs=[self.inner_lrs[s]])
            if s == len(train) - 1:
                params = {k: full[k] + step[k] - step[k].detach() for k in step}
            else:  # intermediate values: recompute the full batch's step s exactly
                with torch.no_grad():
                    mid = self.adapt({k: v.detach() for k, v in theta.items()}, train[: s + 1], first_order=True)
                params = {k: mid[k] + step[k] - step[k].detach() for k in step}
        return params

    # -- one meta-update ---------------------------------------------------------------------
    def step(self, batch: RLBatch, iteration: int) -> dict[str, float]:
        """One TRPO meta-update of the policy from a meta-batch's inner-step and validation data.

        ``batch.adapted``: the per-task parameters that sampled ``batch.valid`` (the first-order
        inner loop from the current ``theta``), if the sampler kept them: saves recomputing them.
        """
        train, valid, adapted = batch
        theta0 = self.theta()
        if adapted is not None:
            with torch.no_grad():
                old = tuple(o.detach() for o in self.policy.outputs(valid.episodes.observations, adapted))
        else:
            old = self.old_outputs(theta0, train, valid)
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        surrogate, kl = self.surrogate_and_kl(theta, train, valid, old)
        grads = torch.autograd.grad(surrogate, list(theta.values()))
        g = flatten(dict(zip(theta, grads))).detach()
        loss_before = float(surrogate.detach())
        if not torch.isfinite(g).all() or not g.any():  # nothing to follow: keep theta
            return {
                "loss/surrogate_before": loss_before,
                "loss/surrogate_after": loss_before,
                "kl": 0.0,
                "kl_before": float(kl.detach()),
                "line_search/steps": 0,
                "line_search/accepted": 0.0,
                "line_search/fraction": 0.0,
                "grad_norm": float(g.norm()),
            }

        fvp = self.fisher_vector_product(theta0, train, valid)
        direction = conjugate_gradient(fvp, g, iterations=self.cg_iterations)
        beta = trpo_step_size(direction, fvp(direction), self.max_kl)
        full_step = -beta * direction

        def evaluate(step: torch.Tensor) -> tuple[float, float]:
            candidate = {k: theta0[k] + v for k, v in unflatten(step, theta0).items()}
            with torch.no_grad():
                loss, kl_new = self.surrogate_and_kl(candidate, train, valid, old)
            return float(loss), float(kl_new)

        result = line_search(
            evaluate,
            full_step,
            loss_before=loss_before,
            max_kl=self.max_kl,
            ratio=self.line_search_ratio,
            max_steps=self.line_search_steps,
        )
        if result.accepted:
            with torch.no_grad():
                for p, delta in zip(self.policy.parameters(), unflatten(result.step, theta0).values()):
                    p.add_(delta)
        return {
            "loss/surrogate_before": loss_before,
            "loss/surrogate_after": result.loss,
            "kl": result.kl,
            "kl_before": float(kl.detach()),
            "line_search/steps": result.steps_taken,
            "line_search/accepted": float(result.accepted),
            "line_search/fraction": result.fraction,
            "grad_norm": float(g.norm()),
        }


def _trpo_kwargs(cfg: Any) -> dict[str, Any]:
    t = cfg.outer.trpo
    return dict(
        inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps),
        max_kl=t.max_kl,
        cg_iterations=t.cg_iterations,
        cg_damping=t.cg_damping,
        line_search_steps=t.line_search_steps,
        line_search_ratio=t.line_search_ratio,
        fvp_subsample=t.fvp_subsample,
    )


@register("maml_trpo", family="rl")
def build_maml_trpo(cfg: Any, policy: nn.Module, objective: PolicyGradientObjective) -> MAMLTRPO:
    return MAMLTRPO(policy, objective, **_trpo_kwargs(cfg))


@register("fomaml", family="rl")
def build_fomaml(cfg: Any, policy: nn.Module, objective: PolicyGradientObjective) -> MAML:
    """FOMAML with the TRPO outer step (``outer.optimizer: trpo``) or Adam (``adam``)."""
    if cfg.outer.optimizer == "trpo":
        return MAMLTRPO(policy, objective, first_order=True, **_trpo_kwargs(cfg))
    return MAML(
        policy, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps), outer_lr=cfg.outer.lr, first_order=True
    )
