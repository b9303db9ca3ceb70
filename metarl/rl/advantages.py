"""Returns and advantages of episodes: discounted returns, GAE with a fitted value baseline, normalisation.

Shapes as in :mod:`metarl.rl.episodes`: every per-step tensor is ``[N, H, E]``; the only Python
loops run backwards over the time axis.
"""

from __future__ import annotations

import torch

from metarl.rl.episodes import Episodes
from metarl.rl.value_baselines import Baseline


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {what} = {shape}")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go within each episode: ``G_t = r_t + gamma * G_{t+1}``, no bootstrapping.

    ``rewards``, ``mask``: ``[N, H, E]``. Returns ``[N, H, E]``, zero where ``mask`` is 0
    (rewards under the mask are ignored).
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [N, H, E], got shape {tuple(rewards.shape)}")
    _check_shape("mask", mask, tuple(rewards.shape), "rewards.shape [N, H, E]")
    _check_unit("gamma", gamma)
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [N, E]: G_{t+1}, zero past the end
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    terminated: torch.Tensor,
    final_values: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al., 2016), ``[N, H, E]``.

    ``rewards``, ``values`` (``V(s_t)``), ``mask``: ``[N, H, E]``; ``terminated`` (bool) and
    ``final_values`` (``V(final observation)``): ``[N, E]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``
    within an episode. At an episode's last real step ``V_{t+1}`` is 0 if it terminated, else
    ``final_values`` (a truncated episode bootstraps). Zero where ``mask`` is 0; values and
    rewards under the mask are never used.
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [N, H, E], got shape {tuple(rewards.shape)}")
    n, h, e = rewards.shape
    _check_shape("values", values, (n, h, e), "rewards.shape [N, H, E]")
    _check_shape("mask", mask, (n, h, e), "rewards.shape [N, H, E]")
    _check_shape("terminated", terminated, (n, e), "[N, E]")
    _check_shape("final_values", final_values, (n, e), "[N, E]")
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)

    mask = mask.to(rewards.dtype)
    values = values.to(rewards.dtype) * mask
    bootstrap = torch.where(terminated, 0.0, final_values.to(rewards.dtype))  # [N, E]
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # mask_{t+1}
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    is_last = (mask > 0) & (next_mask == 0)  # the last real step of each episode
    next_values = torch.where(is_last, bootstrap.unsqueeze(1), next_values)
    deltas = (rewards + gamma * next_values - values) * mask

    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])  # A_{t+1}, zero past the end
    for t in range(h - 1, -1, -1):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def normalize_advantages(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per task, ``(A - mean) / (std + eps)`` over that task's real steps; 0 where ``mask`` is 0.

    ``advantages``, ``mask``: ``[N, H, E]``. ``std`` is the population standard deviation
    (``unbiased=False``: divides by the number of real steps, not by that number minus one).
    A task with no real steps gets all zeros.
    """
    if advantages.dim() != 3:
        raise ValueError(f"advantages must be [N, H, E], got shape {tuple(advantages.shape)}")
    _check_shape("mask", mask, tuple(advantages.shape), "advantages.shape [N, H, E]")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mask = mask.to(advantages.dtype)
    count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)  # [N, 1, 1]
    a = advantages * mask
    mean = a.sum(dim=(1, 2), keepdim=True) / count
    centred = (a - mean) * mask
    std = (centred.square().sum(dim=(1, 2), keepdim=True) / count).sqrt()
    return centred / (std + eps)


def bootstrap_discounts(episodes: Episodes, gamma: float) -> torch.Tensor:
    """``gamma^(L - t)`` at every real step ``t`` of a truncated episode of length ``L``, 0 elsewhere
    (terminated episodes, masked steps): ``[N, H, E]``, in the rewards' dtype.

    The weight of ``V(final observation)`` in the bootstrapped return of step ``t``.
    """
    _check_unit("gamma", gamma)
    h = episodes.horizon
    steps = torch.arange(h, device=episodes.rewards.device).view(1, h, 1)
    exponent = (episodes.lengths.unsqueeze(1) - steps).clamp_min(0).to(episodes.rewards.dtype)  # L - t
    truncated = (~episodes.terminated).unsqueeze(1) & (episodes.mask > 0)
    return torch.where(truncated, torch.as_tensor(gamma, dtype=exponent.dtype).pow(exponent), 0.0)


def compute_advantages(
    episodes: Episodes,
    baseline: Baseline,
    *,
    gamma: float,
    gae_lambda: float,
    normalize: bool,
    bootstrap_truncated: bool = False,
) -> torch.Tensor:
    """Advantages ``[N, H, E]`` of a batch, with a baseline fitted per task.

    Fits ``baseline`` on each task's discounted returns, evaluates it at every step and at the
    final observations, runs :func:`gae`, then (if ``normalize``) :func:`normalize_advantages`.

    Where an episode ends:

    - ``bootstrap_truncated=False`` (default; the finite-horizon objective of MAML, rllab and
      pytorch-maml-rl): the horizon is part of the task, so every episode's end is terminal:
      no value follows the last step, whether the episode terminated or reached the horizon.
      The baseline is fitted to the finite-horizon returns-to-go, consistently.
    - ``bootstrap_truncated=True``: a time limit that is not part of the task (an infinite-
      horizon task cut for sampling). A truncated episode bootstraps with ``V(final
      observation)``, and the baseline is fitted to returns bootstrapped the same way (its own
      value at the final observation: see :mod:`metarl.rl.value_baselines`). Terminated
      episodes still end with 0.
    """
    returns = discounted_returns(episodes.rewards, episodes.mask, gamma)
    if bootstrap_truncated:
        weights = baseline.fit(episodes, returns, bootstrap_discounts=bootstrap_discounts(episodes, gamma))
        terminated = episodes.terminated
    else:
        weights = baseline.fit(episodes, returns)
        terminated = torch.ones_like(episodes.terminated)
    values, final_values = baseline.values(episodes, weights)
    advantages = gae(
        episodes.rewards,
        values,
        episodes.mask,
        terminated=terminated,
        final_values=final_values,
        gamma=gamma,
        lam=gae_lambda,
    )
    if normalize:
        advantages = normalize_advantages(advantages, episodes.mask)
    return advantages
