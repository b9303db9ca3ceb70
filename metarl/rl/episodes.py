"""Episodes of many tasks at once (time-major tensors + mask), returns and advantages.

Shapes: ``N`` tasks, ``H`` the horizon (longest episode possible), ``E`` episodes per task.
Every per-step tensor is ``[N, H, E]`` (time-major within a task). An episode occupies a
prefix of the time axis: ``mask[n, :, e]`` reads ``1 ... 1 0 ... 0`` and its length is
``mask.sum(1)``. Episodes of one batch end at different steps.

An episode either *terminated* (the MDP ended: nothing follows its last step) or was
*truncated* (time limit or horizon): its value after the last step is ``V(final_observation)``,
which GAE uses to bootstrap.

Everything is vectorised over ``N`` and ``E``; the only Python loops run over the time axis,
where a backward recursion needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from metarl.rl.value_baselines import Baseline


_PER_STEP = ("observations", "actions", "rewards", "log_probs", "mask")  # [N, H, E, ...]; the others are [N, E, ...]


class Episodes(NamedTuple):
    """``N`` tasks x ``E`` episodes each, horizon ``H`` (the longest episode possible), time-major per task.

    Steps after an episode ended hold zeros (``mask`` 0). Build one and call :meth:`check` to
    validate it: ``Episodes(...).check()`` returns the batch itself or raises ``ValueError``.
    """

    observations: torch.Tensor
    """``[N, H, E, obs_dim]`` float32: observation at each step (0 after the episode ended)."""
    actions: torch.Tensor
    """``[N, H, E, act_dim]`` float32 (continuous) or ``[N, H, E]`` int64 (discrete)."""
    rewards: torch.Tensor
    """``[N, H, E]`` float32, 0 after the episode ended."""
    log_probs: torch.Tensor
    """``[N, H, E]`` float32: log-prob of the action under the sampling policy (0 after the end)."""
    mask: torch.Tensor
    """``[N, H, E]`` float32: 1.0 for steps inside the episode, 0.0 after it ended."""
    final_observations: torch.Tensor
    """``[N, E, obs_dim]``: observation after each episode's last step."""
    terminated: torch.Tensor
    """``[N, E]`` bool: True = ended by termination (no value after it); False = truncated (bootstrap)."""
    lengths: torch.Tensor
    """``[N, E]`` int64: steps in each episode (``mask.sum(1)``)."""
    success: torch.Tensor | None = None
    """``[N, E]`` float32: 1.0 if the env reported ``info["success"]`` during the episode, else 0.0
    (Meta-World); None for envs that do not report success."""

    # ---------------------------------------------------------------------------------------
    # Sizes and views
    # ---------------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return self.observations.shape[0]

    @property
    def horizon(self) -> int:
        return self.observations.shape[1]

    @property
    def episodes_per_task(self) -> int:
        return self.observations.shape[2]

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(*(None if t is None else t.to(device, non_blocking=True) for t in self))

    def task(self, i: int | slice) -> Episodes:
        """Task ``i`` as a batch with ``N = 1`` (or the tasks of a slice); views, not copies."""
        if isinstance(i, slice):
            return Episodes(*(None if t is None else t[i] for t in self))
        n = self.num_tasks
        if not -n <= i < n:
            raise IndexError(f"task index {i} out of range for a batch of {n} tasks")
        i %= n
        return Episodes(*(None if t is None else t[i : i + 1] for t in self))

    def first(self, k: int) -> Episodes:
        """The first ``k`` episodes of every task (views, not copies)."""
        return Episodes(*(None if t is None else t[:, :, :k] if name in _PER_STEP else t[:, :k]
                          for name, t in zip(self._fields, self)))

    @staticmethod
    def cat(episodes: Sequence[Episodes]) -> Episodes:
        """Concatenate batches along the task dimension; horizons and episodes per task must match."""
        if not episodes:
            raise ValueError("cannot concatenate an empty list of Episodes")
        first = episodes[0]
        for k, ep in enumerate(episodes[1:], start=1):
            if ep.horizon != first.horizon:
                raise ValueError(
                    f"cannot concatenate Episodes with different horizons: episodes[0] has H={first.horizon}, "
                    f"episodes[{k}] has H={ep.horizon}")
            if ep.episodes_per_task != first.episodes_per_task:
                raise ValueError(
                    f"cannot concatenate Episodes with different episodes per task: episodes[0] has "
                    f"E={first.episodes_per_task}, episodes[{k}] has E={ep.episodes_per_task}")
        if len({ep.success is None for ep in episodes}) > 1:
            raise ValueError("cannot concatenate Episodes with and without success flags")
        return Episodes(*(None if fields[0] is None else torch.cat(fields, dim=0) for fields in zip(*episodes)))

    # ---------------------------------------------------------------------------------------
    # Statistics
    # ---------------------------------------------------------------------------------------

    def returns_per_episode(self) -> torch.Tensor:
        """``[N, E]`` undiscounted sum of each episode's rewards."""
        return (self.rewards * self.mask).sum(dim=1)

    def mean_return(self) -> float:
        """Mean undiscounted return over all ``N * E`` episodes."""
        return float(self.returns_per_episode().mean())

    def num_steps(self) -> int:
        """Total number of real (unmasked) environment steps."""
        return int(self.lengths.sum())

    # ---------------------------------------------------------------------------------------
    # Validation
    # ---------------------------------------------------------------------------------------

    def check(self) -> Episodes:
        """Validate shapes, dtypes and the mask; return ``self`` or raise ``ValueError`` naming the field.

        Shapes are taken from ``observations [N, H, E, obs_dim]``. The mask must be 0/1 and a
        prefix along ``H`` (``1 ... 1 0 ... 0``), and ``lengths`` must equal ``mask.sum(1)``.
        """
        obs = self.observations
        if obs.dim() != 4:
            raise ValueError(f"observations must be [N, H, E, obs_dim], got shape {tuple(obs.shape)}")
        n, h, e, o = obs.shape
        where = f"from observations {tuple(obs.shape)}"
        expected = {
            "rewards": (n, h, e),
            "log_probs": (n, h, e),
            "mask": (n, h, e),
            "final_observations": (n, e, o),
            "terminated": (n, e),
            "lengths": (n, e),
        }
        if self.success is not None:
            expected["success"] = (n, e)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} {where}")
        act = tuple(self.actions.shape)
        if len(act) not in (3, 4) or act[:3] != (n, h, e):
            raise ValueError(
                f"actions has shape {act}, expected ({n}, {h}, {e}) (discrete) or ({n}, {h}, {e}, act_dim) "
                f"(continuous) {where}")
        if self.terminated.dtype != torch.bool:
            raise ValueError(f"terminated must be a bool tensor, got dtype {self.terminated.dtype}")
        if self.lengths.dtype.is_floating_point or self.lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got dtype {self.lengths.dtype}")
        mask = self.mask
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold only 0.0 and 1.0")
        if h > 1 and (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("mask must be a prefix along H (1 ... 1 0 ... 0): a step follows a masked step")
        bad = self.lengths != mask.sum(dim=1).to(self.lengths.dtype)
        if bad.any():
            k = bad.nonzero()[0].tolist()
            raise ValueError(
                f"lengths disagree with mask.sum(1) at [task, episode] = {k}: "
                f"lengths={int(self.lengths[k[0], k[1]])}, mask sum={int(mask[k[0], :, k[1]].sum())}")
        return self


# -------------------------------------------------------------------------------------------
# Returns and advantages
# -------------------------------------------------------------------------------------------


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


def compute_advantages(
    episodes: Episodes,
    baseline: Baseline,
    *,
    gamma: float,
    gae_lambda: float,
    normalize: bool,
) -> torch.Tensor:
    """Advantages ``[N, H, E]`` of a batch, with a baseline fitted per task.

    Fits ``baseline`` on each task's discounted returns, evaluates it at every step and at the
    final observations, runs :func:`gae`, then (if ``normalize``) :func:`normalize_advantages`.
    """
    returns = discounted_returns(episodes.rewards, episodes.mask, gamma)
    weights = baseline.fit(episodes, returns)
    values, final_values = baseline.values(episodes, weights)
    advantages = gae(
        episodes.rewards,
        values,
        episodes.mask,
        terminated=episodes.terminated,
        final_values=final_values,
        gamma=gamma,
        lam=gae_lambda,
    )
    if normalize:
        advantages = normalize_advantages(advantages, episodes.mask)
    return advantages
