"""The env side of the in-process sampler: a batch of envs that steps only its running slots.

Every batch has ``num_envs`` slots, ``set_tasks`` (one task per slot), ``reset(seeds)`` (one seed
per slot: observations ``[num_envs, obs_dim]``), ``step(actions, running)`` (observations, rewards,
terminated, truncated, each ``[num_envs, ...]``; slots that are not running keep their last
observation and get zero rewards and no flags) and ``close``:

- :class:`NativeBatch`: a family's own vector env (Navigation2D), all envs in one array op;
- :class:`ListBatch`: one unwrapped env per slot, each env's own ``step`` (the reference path);
- :class:`PhysicsListBatch`: the locomotion families through :class:`envs.batched.PhysicsBatch`;
- :class:`MetaWorldListBatch`: Meta-World through :class:`envs.metaworld_batch.MetaWorldBatch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from envs.batched import PhysicsBatch
from envs.metaworld_batch import MetaWorldBatch


class NativeBatch:
    """A family's own vector env (all envs in one array op); steps every env each call."""

    def __init__(self, env_id: str, num_envs: int, horizon: int, env_kwargs: Mapping[str, Any]) -> None:
        self.env = gym.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", max_episode_steps=horizon, **env_kwargs
        )
        self.num_envs = num_envs
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space

    def set_tasks(self, tasks: Sequence[dict[str, Any]]) -> None:
        self.env.unwrapped.set_tasks(list(tasks), allow_out_of_range=True)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        # A native vector env takes one seed for all its envs; Navigation2D's resets are
        # deterministic (every episode starts at the origin), so episodes still do not depend
        # on the batch composition.
        obs, _ = self.env.reset(seed=int(seeds[0]))
        return obs

    def step(self, actions: np.ndarray, running: np.ndarray):
        obs, rewards, terminated, truncated, _ = self.env.step(actions)
        return obs, rewards, terminated, truncated

    def close(self) -> None:
        self.env.close()


class ListBatch:
    """One unwrapped env per slot, stepped in a loop over the running slots only."""

    def __init__(self, env_id: str, num_envs: int, horizon: int, env_kwargs: Mapping[str, Any]) -> None:
        self.envs = [gym.make(env_id, disable_env_checker=True, **env_kwargs).unwrapped for _ in range(num_envs)]
        if getattr(self.envs[0], "task_independent_model", False):
            self._share_model()
        self.num_envs = num_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        obs_dim = int(np.prod(self.single_observation_space.shape))
        self._obs = np.zeros((num_envs, obs_dim), dtype=np.float32)
        self._rewards = np.zeros(num_envs)
        self._terminated = np.zeros(num_envs, dtype=bool)
        self._truncated = np.zeros(num_envs, dtype=bool)
        self.success = np.zeros(num_envs, dtype=np.float32)  # info["success"] seen in the episode
        self.reports_success = False

    def _share_model(self) -> None:
        """Point every env at the first env's MjModel, each with its own MjData.

        A MuJoCo model is ~0.5 MB against ~15 KB of data: 800 copies of it thrash the CPU
        caches. Only for families whose task never writes the model (reward-only families)."""
        import mujoco

        model = self.envs[0].model
        for env in self.envs[1:]:
            env.model = model
            env.data = mujoco.MjData(model)

    def set_tasks(self, tasks: Sequence[dict[str, Any]]) -> None:
        for env, task in zip(self.envs, tasks):
            env.set_task(task, allow_out_of_range=True)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        for i, (env, seed) in enumerate(zip(self.envs, seeds)):
            self._obs[i] = env.reset(seed=int(seed))[0]
        self.success[:] = 0.0
        return self._obs.copy()

    def step(self, actions: np.ndarray, running: np.ndarray):
        obs, rewards, terminated, truncated = self._obs, self._rewards, self._terminated, self._truncated
        rewards[:] = 0.0
        terminated[:] = False
        truncated[:] = False
        envs_ = self.envs
        success = self.success
        for i in np.flatnonzero(running):
            o, r, te, tr, info = envs_[i].step(actions[i])
            obs[i] = o
            rewards[i] = r
            terminated[i] = te
            truncated[i] = tr
            if "success" in info:
                self.reports_success = True
                if info["success"]:
                    success[i] = 1.0
        return obs.copy(), rewards.copy(), terminated.copy(), truncated.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()


class PhysicsListBatch(ListBatch):
    """The locomotion families: the same envs, stepped together by :class:`envs.batched.PhysicsBatch`.

    The physics of all running envs per call (on ``threads`` threads), the observations, rewards
    and terminations in NumPy; the episodes equal those of the envs' own ``step``."""

    def __init__(self, env_id: str, num_envs: int, horizon: int, env_kwargs: Mapping[str, Any], threads: int) -> None:
        super().__init__(env_id, num_envs, horizon, env_kwargs)
        self.physics = PhysicsBatch(self.envs, threads=threads)

    def set_tasks(self, tasks: Sequence[dict[str, Any]]) -> None:
        super().set_tasks(tasks)
        self.physics.refresh_tasks()

    def step(self, actions: np.ndarray, running: np.ndarray):
        obs, rewards, terminated, _ = self.physics.step(actions, running)
        self._obs[running] = obs[running]
        return (
            self._obs.copy(),
            np.where(running, rewards, 0.0),
            running & terminated,
            np.zeros(self.num_envs, dtype=bool),
        )

    def close(self) -> None:
        self.physics.close()


class MetaWorldListBatch(ListBatch):
    """Meta-World: the same envs, stepped together by :class:`envs.metaworld_batch.MetaWorldBatch`
    (Meta-World's step without its overhead, quaternions batched; the same episodes)."""

    def __init__(self, env_id: str, num_envs: int, horizon: int, env_kwargs: Mapping[str, Any], threads: int) -> None:
        super().__init__(env_id, num_envs, horizon, env_kwargs)
        self.physics = MetaWorldBatch(self.envs, threads=threads)
        self.reports_success = True

    def step(self, actions: np.ndarray, running: np.ndarray):
        obs, rewards, terminated, truncated, _ = self.physics.step(actions, running)
        self._obs[running] = obs[running]
        self.success[running & (self.physics.success > 0)] = 1.0
        return self._obs.copy(), np.where(running, rewards, 0.0), running & terminated, running & truncated

    def close(self) -> None:
        self.physics.close()
