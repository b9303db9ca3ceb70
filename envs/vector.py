"""Step a task family as a batch of envs with different tasks.

``make_task_vector_env(env_id, num_envs)`` gives a vector env with ``set_tasks(tasks)``,
``get_tasks()`` and ``sample_tasks(n)``: the family's native vector env where it has one
(Navigation2D: all envs in one array operation), else :class:`SyncTaskVectorEnv`, gymnasium's
``SyncVectorEnv`` over one env per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym


class SyncTaskVectorEnv(gym.vector.SyncVectorEnv):
    """``SyncVectorEnv`` whose sub-envs are task envs, each holding its own task."""

    def set_tasks(self, tasks: Sequence[dict[str, Any]], *, allow_out_of_range: bool = False) -> None:
        if len(tasks) != self.num_envs:
            raise ValueError(f"set_tasks needs {self.num_envs} tasks (one per env), got {len(tasks)}")
        for env, task in zip(self.envs, tasks):
            env.unwrapped.set_task(task, allow_out_of_range=allow_out_of_range)

    def get_tasks(self) -> list[dict[str, Any]]:
        return [env.unwrapped.get_task() for env in self.envs]

    def sample_tasks(self, n: int) -> list[dict[str, Any]]:
        """``n`` tasks from the first sub-env's generator (seeded by ``reset(seed=...)``)."""
        return self.envs[0].unwrapped.sample_tasks(n)


def make_task_vector_env(env_id: str, num_envs: int, **kwargs: Any):
    """A vector env of ``num_envs`` copies of ``env_id`` whose tasks can be set one by one."""
    spec = gym.spec(env_id)
    if spec.vector_entry_point is not None:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    return SyncTaskVectorEnv([lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)])
