"""The RL side of the inner loop: policy-gradient support loss and surrogate query loss, batched over tasks.

Shapes: a meta-batch has ``N`` tasks; per-task parameters carry a leading ``[N, ...]`` dimension
(the policy runs each task's observations through that task's parameters in one batched matmul).
The support loss of the meta-batch is the *sum* of the tasks' losses, so its gradient with
respect to the per-task parameters ``[N, ...]`` is each task's own gradient, and one
:func:`metarl.core.functional.adapt` call adapts every task at once. For task ``i`` with
episodes ``D_i`` sampled with the current parameters and their advantages ``A``::

    L_i(p) = - mean_D_i[ log pi_p(a_t | s_t) * A_t ]      (REINFORCE)
    phi_i  = p - lr * grad L_i(p)

``mean_D_i`` is the task mean of :func:`task_mean`: over all real steps of the task
(``average="steps"``), or over each episode's steps, then over episodes (``"episodes"``, as
pytorch-maml-rl). They differ when episodes end early.

Inner step ``s`` uses the episodes sampled with the parameters after ``s`` steps (the caller
samples them). The query loss is the importance-weighted surrogate on the validation episodes
``V_i`` sampled with ``phi_i``::

    surrogate(theta) = mean_i - mean_V_i[ exp(log pi_{phi_i(theta)}(a|s) - log pi_old(a|s)) * A_t ]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from metarl.core.functional import Params, adapt
from metarl.rl.episodes import Episodes

Average = Literal["steps", "episodes"]
AVERAGES = ("steps", "episodes")


class StepData(NamedTuple):
    """Episodes of one inner step (or the validation episodes) with their advantages ``[N, H, E]``,
    and how the losses average over a task's steps (:func:`task_mean`)."""

    episodes: Episodes
    advantages: torch.Tensor
    average: Average = "steps"

    def to(self, device: torch.device | str) -> StepData:
        return StepData(self.episodes.to(device), self.advantages.to(device), self.average)

    def head(self, fraction: float) -> StepData:
        """The first ``ceil(fraction * E)`` episodes of every task."""
        e = self.episodes.episodes_per_task
        k = max(1, math.ceil(fraction * e))
        if k >= e:
            return self
        return StepData(self.episodes.first(k), self.advantages[:, :, :k], self.average)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-task mean of ``values [N, H, E]`` over this batch's real steps: ``[N]`` (:func:`task_mean`)."""
        return task_mean(values, self.episodes, self.average)

    def step_weights(self) -> torch.Tensor:
        """``[N, H, E]`` weights of the steps in :meth:`mean`: ``mean(v) == (v * weights).sum((1, 2))``."""
        eps = self.episodes
        if self.average == "steps":
            return eps.mask / eps.mask.sum((1, 2), keepdim=True).clamp(min=1.0)
        return eps.mask / eps.lengths.unsqueeze(1).clamp(min=1).to(eps.mask.dtype) / eps.episodes_per_task


class RLBatch(NamedTuple):
    """One meta-iteration's data: the episodes of each inner step, the validation episodes, and
    the per-task parameters ``[N, ...]`` that sampled the validation episodes."""

    train: list[StepData]
    valid: StepData
    adapted: Params | None = None


def expand_to_tasks(params: Params, n: int) -> Params:
    """Shared parameters as per-task ones ``[N, ...]`` (a view; gradients flow back to ``params``)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


def masked_task_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-task mean over real steps: ``[N, H, E] -> [N]``."""
    return (values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1.0)


def task_mean(values: torch.Tensor, episodes: Episodes, average: Average) -> torch.Tensor:
    """Per-task mean of ``values [N, H, E]``: ``[N]``.

    ``"steps"``: over all real steps of the task (``sum mask * v / sum mask``). ``"episodes"``:
    each episode's mean over its real steps, then the mean over the task's ``E`` episodes
    (pytorch-maml-rl's ``weighted_mean`` with episode lengths): a short episode's steps weigh more.
    """
    if average == "steps":
        return masked_task_mean(values, episodes.mask)
    if average == "episodes":
        per_episode = (values * episodes.mask).sum(1) / episodes.lengths.clamp(min=1).to(values.dtype)  # [N, E]
        return per_episode.mean(-1)
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def surrogate_of(dist: torch.distributions.Distribution, valid: StepData) -> torch.Tensor:
    """The surrogate of ``dist`` (the adapted policies' distributions ``[N, H, E]`` at the validation
    steps) against the log-probs that sampled ``valid``: a scalar, mean over tasks."""
    eps = valid.episodes
    ratio = torch.exp(dist.log_prob(eps.actions) - eps.log_probs)
    return -valid.mean(ratio * valid.advantages).mean()


def clipped_surrogate(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-step clipped loss ``-min(r A, clip(r, 1 - clip, 1 + clip) A)``, ``r = exp(log_probs - old)``,
    and ``r`` (all the shape of ``log_probs``)."""
    ratio = torch.exp(log_probs - old_log_probs)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages), ratio


class PolicyGradientObjective:
    """Support loss (REINFORCE) and query loss (surrogate) of a policy over a meta-batch of tasks."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy

    def support_loss(self, params: Params, data: StepData) -> torch.Tensor:
        """Sum over tasks of the per-task REINFORCE loss (so per-task gradients come out)."""
        eps = data.episodes
        log_probs = self.policy(eps.observations, params).log_prob(eps.actions)
        return -data.mean(log_probs * data.advantages).sum()

    def adapt(self, theta: Params, steps: Sequence[StepData], *, lrs: Sequence[float], first_order: bool) -> Params:
        """Per-task adapted parameters ``[N, ...]`` after ``len(steps)`` inner steps from ``theta``.

        ``steps[s]`` holds the episodes sampled with the parameters after ``s`` steps. Stays
        differentiable in ``theta`` through every step unless first-order.
        """
        if len(steps) > len(lrs):
            raise ValueError(f"{len(steps)} inner steps of data but only {len(lrs)} inner learning rates")
        params = expand_to_tasks(theta, steps[0].episodes.num_tasks) if steps else dict(theta)
        for s, data in enumerate(steps):
            params = adapt(
                lambda p, _step, data=data: self.support_loss(p, data), params, lrs=[lrs[s]], first_order=first_order
            )
        return params

    def surrogate(self, phi: Params, valid: StepData) -> torch.Tensor:
        """Importance-weighted surrogate of the adapted policies on their validation episodes (scalar)."""
        return surrogate_of(self.policy(valid.episodes.observations, phi), valid)

    def meta_loss(
        self, params: Params, batch: RLBatch, *, lrs: Sequence[float], first_order: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The surrogate of the policies adapted from ``params``, and its value as a metric."""
        surrogate = self.surrogate(self.adapt(params, batch.train, lrs=lrs, first_order=first_order), batch.valid)
        return surrogate, {"loss/surrogate_before": surrogate.detach()}

    def adapt_with_metrics(self, params: Params, batch: RLBatch, *, lrs: Sequence[float]) -> tuple[Params, dict]:
        """First-order adapted parameters ``[N, ...]`` (the returns are logged by the experiment)."""
        return self.adapt(params, batch.train, lrs=lrs, first_order=True), {}
