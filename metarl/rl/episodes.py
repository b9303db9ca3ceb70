"""Episodes of many tasks at once: time-major tensors and a mask (returns and advantages: :mod:`metarl.rl.advantages`).

Shapes: ``N`` tasks, ``H`` the horizon (longest episode possible), ``E`` episodes per task.
Every per-step tensor is ``[N, H, E]`` (time-major within a task). An episode occupies a
prefix of the time axis: ``mask[n, :, e]`` reads ``1 ... 1 0 ... 0`` and its length is
``mask.sum(1)``. Episodes of one batch end at different steps.

An episode either *terminated* (the MDP ended: nothing follows its last step) or was
*truncated* (time limit or horizon). Whether a truncated episode bootstraps with
``V(final_observation)`` is the advantage estimator's choice
(:func:`metarl.rl.advantages.compute_advantages`: not by default, where the horizon is part of
the task).

Everything is vectorised over ``N`` and ``E``; the only Python loops run over the time axis,
where a backward recursion needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

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
    """``[N, E]`` bool: True = ended by termination (no value after it); False = truncated
    (time limit or horizon)."""
    lengths: torch.Tensor
    """``[N, E]`` int64: steps in each episode (``mask.sum(1)``)."""
    success: torch.Tensor | None = None
    """``[N, E]`` float32: 1.0 if the env reported ``info["success"]`` during the episode, else 0.0
    (Meta-World); None for envs that do not report success."""

    @classmethod
    def from_step_major(
        cls,
        num_tasks: int,
        *,
        observations: torch.Tensor,
        actions: torch.Tensor,
        rewards,
        log_probs: torch.Tensor,
        mask,
        final_observations,
        terminated,
        lengths,
        success=None,
    ) -> Episodes:
        """A batch from a sampler's buffers: per-step ``[H, N * E, ...]`` (episode ``n * E + e`` in
        column order), per-episode ``[N * E, ...]``; NumPy arrays or tensors."""

        def tensor(x) -> torch.Tensor:
            return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)

        h, m = observations.shape[:2]
        n, e = num_tasks, m // num_tasks

        def task_major(x) -> torch.Tensor:  # [H, N*E, ...] -> [N, H, E, ...]
            x = tensor(x)
            return x.reshape(h, n, e, *x.shape[2:]).transpose(0, 1).contiguous()

        return cls(
            observations=task_major(observations),
            actions=task_major(actions),
            rewards=task_major(rewards),
            log_probs=task_major(log_probs),
            mask=task_major(mask),
            final_observations=tensor(final_observations).view(n, e, -1),
            terminated=tensor(terminated).view(n, e),
            lengths=tensor(lengths).view(n, e),
            success=None if success is None else tensor(success).view(n, e),
        )

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
        return Episodes(
            *(
                None if t is None else t[:, :, :k] if name in _PER_STEP else t[:, :k]
                for name, t in zip(self._fields, self)
            )
        )

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
                    f"episodes[{k}] has H={ep.horizon}"
                )
            if ep.episodes_per_task != first.episodes_per_task:
                raise ValueError(
                    f"cannot concatenate Episodes with different episodes per task: episodes[0] has "
                    f"E={first.episodes_per_task}, episodes[{k}] has E={ep.episodes_per_task}"
                )
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
                f"(continuous) {where}"
            )
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
                f"lengths={int(self.lengths[k[0], k[1]])}, mask sum={int(mask[k[0], :, k[1]].sum())}"
            )
        return self
