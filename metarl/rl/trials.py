"""Trials as sequences: the learner's view of RL^2's episodes, and GAE over a whole trial.

The trial sampler (:mod:`metarl.rl.sampling.trials`) returns ordinary :class:`Episodes` ``[N, H, E]``
whose episode ``e = r * K + k`` is episode ``k`` of trial ``r``. :func:`trial_sequences` lays each
trial out as one sequence of its real steps, episode after episode (``B = N * E / K`` trials,
``T = K * H`` positions, the real steps first)::

    position   0 ........ L0-1 | L0 ........ L0+L1-1 | ... | (padding, mask 0)
    episode    0               | 1                   | ...

with the inputs the recurrent policy read at each step: the previous step's action and reward
(zeros at the trial's first step) and the done flag, 1 at the first step of episodes ``k > 0``.
These are the inputs the sampler fed, so a forward pass over the sequence reproduces the states
of sampling.

:func:`trial_gae` computes generalised advantages over a trial as one episode: the discount runs
across the trial's episode boundaries (the trial is RL^2's MDP: an episode's end is a transition
to the next episode's start) and nothing follows the trial's last step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metarl.rl.episodes import Episodes


class TrialSequences(NamedTuple):
    """``B`` trials of up to ``T = K * H`` steps, real steps first (``mask`` a prefix)."""

    observations: torch.Tensor
    """``[B, T, obs_dim]``."""
    actions: torch.Tensor
    """``[B, T, act_dim]``: the policy's actions."""
    rewards: torch.Tensor
    """``[B, T]``."""
    log_probs: torch.Tensor
    """``[B, T]``: log-probabilities under the sampling policy."""
    mask: torch.Tensor
    """``[B, T]`` float: 1 for real steps."""
    prev_actions: torch.Tensor
    """``[B, T, act_dim]``: the action of the step before (0 at position 0)."""
    prev_rewards: torch.Tensor
    """``[B, T]``: the reward of the step before (0 at position 0)."""
    done: torch.Tensor
    """``[B, T]``: 1 at the first step of the trial's episodes 1 .. K-1."""
    episode: torch.Tensor
    """``[B, T]`` int64: the episode of the trial (0 .. K-1) each position belongs to (K for padding)."""


def trial_sequences(episodes: Episodes, episodes_per_trial: int) -> TrialSequences:
    """The trials of ``episodes`` (``E / K`` per task, ``K = episodes_per_trial``) as sequences."""
    n, h, e = episodes.num_tasks, episodes.horizon, episodes.episodes_per_task
    k = episodes_per_trial
    if k < 1 or e % k:
        raise ValueError(f"episodes per task ({e}) must be a multiple of episodes_per_trial ({k})")
    r = e // k

    def seq(x: torch.Tensor) -> torch.Tensor:  # [N, H, E, ...] -> [N * R, K * H, ...], trial-major
        extra = x.shape[3:]
        split = x.reshape(n, h, r, k, *extra)  # episode e = r * K + k
        ordered = split.permute(0, 2, 3, 1, *range(4, 4 + len(extra)))  # [N, R, K, H, ...]
        return ordered.reshape(n * r, k * h, *extra)

    mask = seq(episodes.mask)
    # the real steps first, in time order: a stable sort on "is padding"
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    episode_of = torch.arange(k, device=mask.device).repeat_interleave(h).expand(n * r, k * h)

    def gather(x: torch.Tensor) -> torch.Tensor:
        index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
        return torch.gather(x, 1, index)

    mask = gather(mask)
    observations = gather(seq(episodes.observations)) * mask.unsqueeze(-1)
    actions = gather(seq(episodes.actions)) * mask.unsqueeze(-1)
    rewards = gather(seq(episodes.rewards)) * mask
    log_probs = gather(seq(episodes.log_probs)) * mask
    episode = torch.where(mask > 0, gather(episode_of), torch.full_like(episode_of, k))
    prev_actions = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)
    prev_rewards = torch.cat([torch.zeros_like(rewards[:, :1]), rewards[:, :-1]], dim=1)
    starts = torch.cat([torch.zeros_like(episode[:, :1], dtype=torch.bool), episode[:, 1:] != episode[:, :-1]], dim=1)
    done = (starts & (mask > 0)).to(rewards.dtype)
    return TrialSequences(observations, actions, rewards, log_probs, mask, prev_actions, prev_rewards, done, episode)


def trial_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """Generalised advantages ``[B, T]`` of trials (``rewards``, ``values``, ``mask``: ``[B, T]``, mask a prefix)::

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * m_{t+1} * A_{t+1}         (0 after the trial's last step)
    """
    b, t_len = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(b)
    next_adv = rewards.new_zeros(b)
    next_mask = rewards.new_zeros(b)
    for t in range(t_len - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_adv = (delta + gamma * gae_lambda * next_mask * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value, next_mask = values[:, t], mask[:, t]
    return advantages


@torch.no_grad()
def trial_context(policy, params: dict[str, torch.Tensor], episodes: Episodes, k: int) -> dict[str, torch.Tensor]:
    """Where the first trial of ``episodes`` (trials of ``k``) leaves a recurrent policy: its state
    ``[state_dim]`` (replayed step by step with the sampler's cell), the last action and reward, and
    ``done`` 1 (the next step starts a new episode). ``params``: the policy's, without a task dimension."""
    seqs = trial_sequences(episodes, k)
    length = int(seqs.mask[0].sum())
    x = policy.inputs(seqs.observations[0], seqs.prev_actions[0], seqs.prev_rewards[0], seqs.done[0])
    batched = {name: v.unsqueeze(0) for name, v in params.items()}
    state = policy.initial_state(1, 1)
    for t in range(length):
        state = policy.cell(x[t].view(1, 1, -1), state, batched)
    return {
        "state": state.view(-1).clone(),
        "prev_action": seqs.actions[0, length - 1].clone(),
        "prev_reward": seqs.rewards[0, length - 1].clone(),
        "done": torch.tensor(1.0),
    }
