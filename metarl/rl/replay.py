"""Per-task replay buffers for off-policy meta-RL (PEARL): transitions of each training task, apart.

:class:`TaskReplayBuffers` holds ``T`` ring buffers, one per task of a fixed training set, each of
``capacity`` transitions ``(observation, action, reward, next_observation, terminal)``. Adding
past capacity overwrites a task's oldest transitions. Draws are uniform over what a task holds,
with replacement, from a ``numpy.random.Generator`` the caller seeds, so a run repeats its draws.

Shapes of a draw for tasks ``[t_1 .. t_K]`` and ``B`` transitions each: ``observations [K, B,
obs_dim]``, ``actions [K, B, act_dim]``, ``rewards [K, B]``, ``next_observations [K, B, obs_dim]``,
``terminals [K, B]`` (float32 tensors).

The buffers are part of a run's checkpoint (:meth:`state_dict`, plain tensors, so they load with
``weights_only=True``); only the filled part of each buffer is stored. :meth:`nbytes` says how
much that is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from metarl.rl.episodes import Episodes


class Transitions(NamedTuple):
    """A draw of ``B`` transitions from each of ``K`` tasks (see the module docstring for shapes)."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor


_FIELDS = Transitions._fields


class TaskReplayBuffers:
    """``num_tasks`` ring buffers of ``capacity`` transitions each.

    Args:
        num_tasks: ``T``, the training tasks (buffer ``i`` holds task ``i``'s transitions).
        capacity: transitions per task; the oldest are overwritten past it.
        obs_dim, act_dim: sizes of an observation and an action.
    """

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int) -> None:
        if num_tasks < 1 or capacity < 1 or obs_dim < 1 or act_dim < 1:
            raise ValueError(
                f"replay buffers need num_tasks, capacity, obs_dim and act_dim >= 1, got {num_tasks}, {capacity}, "
                f"{obs_dim}, {act_dim}"
            )
        self.num_tasks, self.capacity = int(num_tasks), int(capacity)
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        t, c = self.num_tasks, self.capacity
        self._data = {
            "observations": np.zeros((t, c, obs_dim), dtype=np.float32),
            "actions": np.zeros((t, c, act_dim), dtype=np.float32),
            "rewards": np.zeros((t, c), dtype=np.float32),
            "next_observations": np.zeros((t, c, obs_dim), dtype=np.float32),
            "terminals": np.zeros((t, c), dtype=np.float32),
        }
        self.sizes = np.zeros(t, dtype=np.int64)  # transitions held per task
        self._next = np.zeros(t, dtype=np.int64)  # where each task's next transition goes

    # -- adding ------------------------------------------------------------------------------
    def add(self, task: int, **fields: np.ndarray) -> None:
        """Append ``M`` transitions to task ``task``: each field ``[M, ...]`` (names as :class:`Transitions`)."""
        self._check_task(task)
        missing = set(_FIELDS) - set(fields)
        if missing or set(fields) - set(_FIELDS):
            raise ValueError(f"add needs exactly the fields {list(_FIELDS)}, got {sorted(fields)}")
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in fields.items()}
        m = len(arrays["rewards"])
        for name, array in arrays.items():
            expected = (m, *self._data[name].shape[2:])
            if array.shape != expected:
                raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
        if m > self.capacity:  # only the last `capacity` would survive
            arrays = {k: v[-self.capacity :] for k, v in arrays.items()}
            m = self.capacity
        where = (self._next[task] + np.arange(m)) % self.capacity
        for name, array in arrays.items():
            self._data[name][task, where] = array
        self._next[task] = (self._next[task] + m) % self.capacity
        self.sizes[task] = min(self.capacity, self.sizes[task] + m)

    def add_episodes(self, tasks: Sequence[int], episodes: Episodes) -> int:
        """Append every step of ``episodes`` (``N`` tasks, in order) to buffers ``tasks[n]``.

        Transitions keep episode order (episode 0's steps, then episode 1's, ...). The next
        observation of an episode's last step is its ``final_observations``; ``terminal`` is 1
        only on the last step of an episode that terminated (a truncated one is not terminal).
        Returns the number of transitions added.
        """
        if len(tasks) != episodes.num_tasks:
            raise ValueError(
                f"add_episodes needs one buffer index per task: {episodes.num_tasks} tasks, {len(tasks)} indices"
            )
        added = 0
        for n, task in enumerate(tasks):
            one = episodes.task(n)
            obs = one.observations[0].transpose(0, 1).numpy()  # [E, H, obs_dim]
            acts = one.actions[0].transpose(0, 1).numpy()
            rews = one.rewards[0].transpose(0, 1).numpy()  # [E, H]
            for e, length in enumerate(one.lengths[0].tolist()):
                nxt = np.concatenate([obs[e, 1:length], one.final_observations[0, e][None].numpy()])
                terminal = np.zeros(length, dtype=np.float32)
                terminal[-1] = float(one.terminated[0, e])
                self.add(
                    task,
                    observations=obs[e, :length],
                    actions=acts[e, :length].reshape(length, -1),
                    rewards=rews[e, :length],
                    next_observations=nxt,
                    terminals=terminal,
                )
                added += length
        return added

    def clear(self, task: int) -> None:
        """Empty task ``task``'s buffer (PEARL's context buffer holds only the latest collection)."""
        self._check_task(task)
        self.sizes[task] = 0
        self._next[task] = 0

    # -- drawing -----------------------------------------------------------------------------
    def sample(self, tasks: Sequence[int], batch_size: int, rng: np.random.Generator) -> Transitions:
        """``batch_size`` transitions of each task in ``tasks``, uniform with replacement."""
        index = np.stack([self._draw(task, batch_size, rng) for task in tasks])  # [K, B]
        rows = np.asarray(tasks)[:, None]
        return Transitions(*(torch.from_numpy(self._data[name][rows, index]) for name in _FIELDS))

    def _draw(self, task: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        self._check_task(task)
        if self.sizes[task] == 0:
            raise ValueError(f"replay buffer of task {task} is empty: collect data for it before drawing")
        return rng.integers(0, self.sizes[task], size=batch_size)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task index {task} out of range: the buffers hold tasks 0..{self.num_tasks - 1}")

    # -- state -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the filled transitions (what a checkpoint stores)."""
        per = sum(a[0, 0].nbytes if a.ndim > 2 else a.itemsize for a in self._data.values())
        return int(self.sizes.sum()) * per

    def state_dict(self) -> dict[str, Any]:
        """The filled part of every buffer as laid out (so draws continue alike), as tensors."""
        return {
            "capacity": self.capacity,
            "sizes": torch.from_numpy(self.sizes.copy()),
            "next": torch.from_numpy(self._next.copy()),
            **{
                name: [torch.from_numpy(self._data[name][t, :size].copy()) for t, size in enumerate(self.sizes)]
                for name in _FIELDS
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes, nxt = state["sizes"].numpy(), state["next"].numpy()
        if len(sizes) != self.num_tasks or int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"replay state holds {len(sizes)} tasks of capacity {int(state['capacity'])}; the run has "
                f"{self.num_tasks} of {self.capacity}"
            )
        for name in _FIELDS:
            for t, size in enumerate(sizes):
                self._data[name][t, :size] = state[name][t].numpy()
        self.sizes[:] = sizes
        self._next[:] = nxt


class ReplayBatch(NamedTuple):
    """What one off-policy meta-iteration (PEARL) learns from: the tasks' buffers and the draws' randomness.

    ``rl``: every transition collected (SAC's data); ``context``: each task's latest collection
    with ``z`` from the prior or the posterior (the encoder's data); ``rng`` draws the tasks and
    transitions of each gradient step, ``generator`` the latent and action noise.
    """

    rl: TaskReplayBuffers
    context: TaskReplayBuffers
    rng: np.random.Generator
    generator: torch.Generator
