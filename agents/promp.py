"""ProMP (Rothfuss et al., 2019): MAML with a low-variance inner estimator and a proximal outer step.

Two changes to MAML-TRPO, both in the objective:

1. **Inner loop: the low-variance curvature (LVC) estimator.** The inner loss of task ``i`` on the
   episodes ``D_i`` sampled with ``pi_old`` is the likelihood ratio against the *sampling* policy::

       L^LVC_i(p) = - mean_D_i[ pi_p(a_t | s_t) / pi_old(a_t | s_t) * A_t ]

   At ``p = theta`` it has REINFORCE's value and gradient; its Hessian, which second-order MAML
   differentiates through, is ``E[(grad log pi grad log pi^T + hess log pi) A]`` per step, without
   the cross-step terms whose variance makes MAML's curvature estimate noisy.
2. **Outer step: PPO's clipped objective with a KL penalty on the inner step**, several Adam steps
   on the same samples::

       J(theta) = mean_i [ mean_V_i min(r A, clip(r, 1 - eps, 1 + eps) A) - eta * mean_D_i KL(pi_old || pi_theta) ]
       r        = pi_{phi_i(theta)}(a | s) / pi_{phi_i(theta_old)}(a | s)       (validation episodes V_i)

   ``phi_i(theta)`` is the inner loop above (second order); the KL penalty keeps the pre-update
   policy near the one that sampled the inner episodes, whose likelihood ratios the LVC loss uses
   (with several inner steps, each step's policy is kept near the one that sampled its episodes).

Defaults as the authors' ``pro-mp_run_mujoco.py``: inner lr 0.1, Adam 1e-3, 5 ProMP steps per
iteration, clip 0.3, fixed KL coefficient ``eta = 5e-4``, 40 tasks x 20 episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from agents.maml import MAML
from metarl.core.functional import Params, adapt, inner_lrs, params_of
from metarl.core.learner import register
from metarl.rl.objective import PolicyGradientObjective, RLBatch, StepData, clipped_surrogate, expand_to_tasks


class LVCObjective(PolicyGradientObjective):
    """The RL objective with ProMP's LVC inner loss (importance ratio against the sampling policy)."""

    def support_loss(self, params: Params, data: StepData) -> torch.Tensor:
        """Sum over tasks of ``-mean[exp(log pi_p(a|s) - log pi_old(a|s)) A]`` (``log pi_old``: the
        episodes' stored log-probabilities)."""
        eps = data.episodes
        log_probs = self.policy(eps.observations, params).log_prob(eps.actions)
        ratio = torch.exp(log_probs - eps.log_probs)
        return -data.mean(ratio * data.advantages).sum()


class ProMP(MAML):
    """ProMP: LVC inner loop (second order), clipped outer objective with an inner-step KL penalty.

    Args:
        policy: the meta-policy (updated in place by :meth:`step`).
        inner_lrs: inner learning rate of each inner step.
        outer_lr: Adam learning rate.
        steps: Adam steps on the clipped objective per meta-iteration (same samples).
        clip: PPO clip range ``eps``.
        kl_coef: the KL penalty's coefficient ``eta``.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        inner_lrs: Sequence[float],
        outer_lr: float = 1e-3,
        steps: int = 5,
        clip: float = 0.3,
        kl_coef: float = 5e-4,
    ) -> None:
        if steps < 1 or not clip > 0 or kl_coef < 0:
            raise ValueError(f"ProMP needs steps >= 1, clip > 0, kl_coef >= 0; got {steps}, {clip}, {kl_coef}")
        super().__init__(policy, LVCObjective(policy), inner_lrs=inner_lrs, outer_lr=outer_lr, first_order=False)
        self.policy = policy
        self.steps, self.clip, self.kl_coef = steps, clip, kl_coef

    def losses(self, theta: Params, batch: RLBatch, old: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        """The clipped objective's loss, the inner-step KL and their penalised sum, differentiable in ``theta``.

        ``old[s]``: the outputs of the policy that sampled inner step ``s``'s episodes."""
        policy, train, valid = self.policy, batch.train, batch.valid
        params = expand_to_tasks(theta, valid.episodes.num_tasks)
        kls = []
        for s, data in enumerate(train):  # the inner loop, keeping each step's policy and its KL
            dist = policy.distribution(policy.outputs(data.episodes.observations, params))
            kl = torch.distributions.kl_divergence(policy.distribution(old[s]), dist)
            kls.append(data.mean(kl).mean())
            step_loss = lambda p, _step, data=data: self.objective.support_loss(p, data)  # noqa: E731
            params = adapt(step_loss, params, lrs=[self.inner_lrs[s]])  # second order
        eps = valid.episodes
        dist = policy.distribution(policy.outputs(eps.observations, params))
        clipped, ratio = clipped_surrogate(dist.log_prob(eps.actions), eps.log_probs, valid.advantages, self.clip)
        surrogate = valid.mean(clipped).mean()
        inner_kl = torch.stack(kls).sum()
        clip_fraction = valid.mean(((ratio - 1).abs() > self.clip).to(ratio.dtype)).mean()
        return {
            "loss": surrogate + self.kl_coef * inner_kl,
            "loss/surrogate": surrogate,
            "inner_kl": inner_kl,
            "clip_fraction": clip_fraction,
        }

    def step(self, batch: RLBatch, iteration: int) -> dict[str, float]:
        theta0 = self.theta()
        with torch.no_grad():  # the policies that sampled each inner step: theta, then its adapted parameters
            old = []
            params = expand_to_tasks(theta0, batch.valid.episodes.num_tasks)
            for s, data in enumerate(batch.train):
                old.append(tuple(o.detach() for o in self.policy.outputs(data.episodes.observations, params)))
                if s + 1 < len(batch.train):
                    params = self.adapt(theta0, batch.train[: s + 1], first_order=True)
        metrics: dict[str, float] = {}
        for j in range(self.steps):
            losses = self.losses(params_of(self.model), batch, old)
            if j == 0:
                metrics["loss/surrogate_before"] = float(losses["loss/surrogate"].detach())
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
        with torch.no_grad():
            after = self.losses(params_of(self.model), batch, old)
        metrics.update(
            {
                "loss/surrogate_after": float(after["loss/surrogate"]),
                "inner_kl": float(after["inner_kl"]),
                "clip_fraction": float(after["clip_fraction"]),
            }
        )
        return metrics


@register("promp", family="rl")
def build_promp(cfg: Any, policy: nn.Module, objective: Any) -> ProMP:
    p = cfg.promp
    return ProMP(
        policy,
        inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps),
        outer_lr=cfg.outer.lr,
        steps=p.steps,
        clip=p.clip,
        kl_coef=p.kl_coef,
    )
