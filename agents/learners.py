"""Policy meta-learners: MAML-TRPO (second order), FOMAML (first order; TRPO or Adam outer step)
and Reptile, on top of the functional inner loop of :mod:`metarl.core.functional`.

Shapes: a meta-batch has ``N`` tasks; per-task parameters carry a leading ``[N, ...]`` dimension
(the policy runs each task's observations through that task's parameters in one batched matmul).
The inner loop is batched across tasks: the inner loss of the meta-batch is the *sum* of the
tasks' losses, so its gradient with respect to the per-task parameters ``[N, ...]`` is each
task's own gradient, and one ``metarl.core.functional.adapt`` call adapts every task at once.

One inner step, for task ``i`` with training episodes ``D_i`` (sampled with the current
parameters) and their advantages ``A``::

    L_i(p) = - sum_t mask * log pi_p(a_t | s_t) * A_t / sum_t mask      (REINFORCE)
    phi_i  = p - lr * grad L_i(p)

Further inner steps use fresh episodes sampled with the adapted parameters (the caller samples
them; :class:`InnerLoop` takes the list of (episodes, advantages) of every step).

MAML-TRPO's outer objective, on validation episodes ``V_i`` sampled with ``phi_i(theta_old)``::

    surrogate(theta) = mean_i  - sum_t mask * exp(log pi_{phi_i(theta)}(a|s) - log pi_old(a|s)) * A_t / sum mask
    kl(theta)        = mean_i  sum_t mask * KL(pi_{phi_i(theta_old)} || pi_{phi_i(theta)}) / sum mask

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
product of the KL. ``fvp_subsample`` uses the first fraction of each task's episodes for the
products, as TRPO implementations commonly do (OpenAI baselines' TRPO uses every 5th sample);
the gradient, the step size check and the line search use the whole batch and the exact KL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from metarl.rl.episodes import Episodes
from metarl.core.functional import Params, adapt
from metarl.core.metalearning import linear_anneal
from metarl.core.trpo import conjugate_gradient, flatten, line_search, trpo_step_size, unflatten


class StepData(NamedTuple):
    """Episodes of one inner step (or the validation episodes) with their advantages ``[N, H, E]``."""

    episodes: Episodes
    advantages: torch.Tensor

    def to(self, device: torch.device | str) -> StepData:
        return StepData(self.episodes.to(device), self.advantages.to(device))

    def head(self, fraction: float) -> StepData:
        """The first ``ceil(fraction * E)`` episodes of every task."""
        e = self.episodes.episodes_per_task
        k = max(1, math.ceil(fraction * e))
        if k >= e:
            return self
        return StepData(self.episodes.first(k), self.advantages[:, :, :k])


def expand_to_tasks(params: Params, n: int) -> Params:
    """Shared parameters as per-task ones ``[N, ...]`` (a view; gradients flow back to ``params``)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


def masked_task_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-task mean over real steps: ``[N, H, E] -> [N]``."""
    return (values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1.0)


class InnerLoop:
    """Batched policy-gradient adaptation of every task of a meta-batch."""

    def __init__(self, policy: nn.Module, *, lrs: Sequence[float], first_order: bool) -> None:
        self.policy = policy
        self.lrs = list(lrs)
        self.first_order = first_order

    def loss(self, params: Params, data: StepData) -> torch.Tensor:
        """Sum over tasks of the per-task REINFORCE loss (so per-task gradients come out)."""
        eps = data.episodes
        log_probs = self.policy(eps.observations, params).log_prob(eps.actions)
        return -masked_task_mean(log_probs * data.advantages, eps.mask).sum()

    def adapt(self, theta: Params, steps: Sequence[StepData], *, first_order: bool | None = None,
              lrs: Sequence[float] | None = None) -> Params:
        """Per-task adapted parameters ``[N, ...]`` after ``len(steps)`` inner steps from ``theta``.

        ``steps[s]`` holds the episodes sampled with the parameters after ``s`` steps. Stays
        differentiable in ``theta`` through every step unless first-order. ``lrs`` overrides the
        loop's learning rates (evaluation and adaptation with more steps than in training).
        """
        lrs = self.lrs if lrs is None else list(lrs)
        if len(steps) > len(lrs):
            raise ValueError(f"{len(steps)} inner steps of data but only {len(lrs)} inner learning rates")
        first_order = self.first_order if first_order is None else first_order
        params = expand_to_tasks(theta, steps[0].episodes.num_tasks) if steps else dict(theta)
        for s, data in enumerate(steps):
            params = adapt(lambda p, _step, data=data: self.loss(p, data), params, lrs=[lrs[s]],
                           first_order=first_order)
        return params


class MAMLTRPO:
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
        self.policy = policy
        self.inner = InnerLoop(policy, lrs=inner_lrs, first_order=first_order)
        self.max_kl = max_kl
        self.cg_iterations = cg_iterations
        self.cg_damping = cg_damping
        self.line_search_steps = line_search_steps
        self.line_search_ratio = line_search_ratio
        self.fvp_subsample = fvp_subsample

    # -- objective ---------------------------------------------------------------------------
    def theta(self) -> Params:
        return {k: v.detach() for k, v in self.policy.named_parameters()}

    def surrogate_and_kl(self, theta: Params, train: Sequence[StepData], valid: StepData,
                         old_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Outer surrogate loss and mean KL to the old adapted policies, both scalars."""
        phi = self.inner.adapt(theta, train)
        eps = valid.episodes
        outputs = self.policy.outputs(eps.observations, phi)
        dist = self.policy.distribution(outputs)
        ratio = torch.exp(dist.log_prob(eps.actions) - eps.log_probs)
        surrogate = -masked_task_mean(ratio * valid.advantages, eps.mask).mean()
        kl = torch.distributions.kl_divergence(self.policy.distribution(old_outputs), dist)
        return surrogate, masked_task_mean(kl, eps.mask).mean()

    def old_outputs(self, theta: Params, train: Sequence[StepData], valid: StepData) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            phi = self.inner.adapt(theta, train, first_order=True)
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
        weights = eps.mask / eps.mask.sum((1, 2), keepdim=True).clamp(min=1.0) / eps.num_tasks
        with torch.enable_grad():
            th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
            if f < 1 and not self.inner.first_order:
                phi = self._adapt_subsampled_jacobian(th, train, f)
            else:
                phi = self.inner.adapt(th, train)
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
            full = self.inner.adapt({k: v.detach() for k, v in theta.items()}, train, first_order=True)
        params = expand_to_tasks(theta, train[0].episodes.num_tasks)
        for s, data in enumerate(train):
            sub = data.head(fraction)
            step = adapt(lambda p, _step, sub=sub: self.inner.loss(p, sub), params, lrs=[self.inner.lrs[s]])
            if s == len(train) - 1:
                params = {k: full[k] + step[k] - step[k].detach() for k in step}
            else:  # intermediate values: recompute the full batch's step s exactly
                with torch.no_grad():
                    mid = self.inner.adapt({k: v.detach() for k, v in theta.items()}, train[: s + 1], first_order=True)
                params = {k: mid[k] + step[k] - step[k].detach() for k in step}
        return params

    # -- one meta-update ---------------------------------------------------------------------
    def step(self, train: Sequence[StepData], valid: StepData, *, adapted: Params | None = None) -> dict[str, float]:
        """One TRPO meta-update of the policy from a meta-batch's inner-step and validation data.

        ``adapted``: the per-task parameters that sampled ``valid`` (the first-order inner loop
        from the current ``theta``), if the caller has them: saves recomputing them.
        """
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
            return {"loss/surrogate_before": loss_before, "loss/surrogate_after": loss_before, "kl": 0.0,
                    "kl_before": float(kl.detach()), "line_search/steps": 0, "line_search/accepted": 0.0,
                    "line_search/fraction": 0.0, "grad_norm": float(g.norm())}

        fvp = self.fisher_vector_product(theta0, train, valid)
        direction = conjugate_gradient(fvp, g, iterations=self.cg_iterations)
        beta = trpo_step_size(direction, fvp(direction), self.max_kl)
        full_step = -beta * direction

        def evaluate(step: torch.Tensor) -> tuple[float, float]:
            candidate = {k: theta0[k] + v for k, v in unflatten(step, theta0).items()}
            with torch.no_grad():
                loss, kl_new = self.surrogate_and_kl(candidate, train, valid, old)
            return float(loss), float(kl_new)

        result = line_search(evaluate, full_step, loss_before=loss_before, max_kl=self.max_kl,
                             ratio=self.line_search_ratio, max_steps=self.line_search_steps)
        if result.accepted:
            with torch.no_grad():
                for (name, p), delta in zip(self.policy.named_parameters(), unflatten(result.step, theta0).values()):
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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FOMAMLAdam:
    """First-order MAML with an Adam meta-update on the surrogate of the adapted policies."""

    def __init__(self, policy: nn.Module, *, inner_lrs: Sequence[float], lr: float) -> None:
        self.policy = policy
        self.inner = InnerLoop(policy, lrs=inner_lrs, first_order=True)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr)

    def step(self, train: Sequence[StepData], valid: StepData) -> dict[str, float]:
        theta = dict(self.policy.named_parameters())
        phi = self.inner.adapt(theta, train)
        eps = valid.episodes
        ratio = torch.exp(self.policy(eps.observations, phi).log_prob(eps.actions) - eps.log_probs)
        surrogate = -masked_task_mean(ratio * valid.advantages, eps.mask).mean()
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        self.optimizer.step()
        return {"loss/surrogate_before": float(surrogate.detach())}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


class ReptilePolicy:
    """Reptile for policies: ``theta <- theta + epsilon * mean_i(phi_i - theta)``, epsilon annealed
    linearly from ``epsilon_start`` (iteration 0) to ``epsilon_end`` (``num_iterations``)."""

    def __init__(self, policy: nn.Module, *, inner_lrs: Sequence[float], epsilon_start: float, epsilon_end: float,
                 num_iterations: int) -> None:
        self.policy = policy
        self.inner = InnerLoop(policy, lrs=inner_lrs, first_order=True)
        self.epsilon_start = epsilon_start
        self.epsilon_end = epsilon_end
        self.num_iterations = num_iterations

    def epsilon(self, iteration: int) -> float:
        return linear_anneal(self.epsilon_start, self.epsilon_end, iteration, self.num_iterations)

    def step(self, train: Sequence[StepData], iteration: int) -> dict[str, float]:
        theta = {k: v.detach() for k, v in self.policy.named_parameters()}
        with torch.no_grad():
            phi = self.inner.adapt(theta, train)
            eps = self.epsilon(iteration)
            for name, p in self.policy.named_parameters():
                p.add_(eps * (phi[name].mean(0) - theta[name]))
        return {"epsilon": eps}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
