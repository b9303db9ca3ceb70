"""2D navigation, the MAML paper's point-robot task (Finn et al. 2017, section 5.3).

A point starts at the origin and moves by its action, clipped to [-0.1, 0.1] per coordinate;
the reward is minus the Euclidean distance to the task's goal after the move; the episode
terminates within 0.01 of the goal and is truncated at the horizon (100 steps, set at
registration). Task: ``{"goal": [x, y]}``, goal ~ U[-0.5, 0.5]^2 by default.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.base import MetaEnv, TaskField, TaskSpec

GOAL_TOLERANCE = 0.01
MAX_ACTION = 0.1


def navigation_spec(goal_range: tuple[float, float]) -> TaskSpec:
    return TaskSpec((TaskField("goal", goal_range[0], goal_range[1], size=2, doc="goal position (x, y)"),))


class Navigation2DEnv(MetaEnv, gym.Env):
    """Point robot reaching a goal in the plane. Observation: position ``[2]`` float32."""

    metadata = {"render_modes": []}

    def __init__(self, *, goal_range: tuple[float, float] = (-0.5, 0.5), task: dict[str, Any] | None = None) -> None:
        self.task_spec = navigation_spec(goal_range)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2)
        self.set_task(task if task is not None else {"goal": [0.0, 0.0]}, allow_out_of_range=True)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._goal = np.asarray(task["goal"], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._position = np.zeros(2)
        return self._position.astype(np.float32), {"goal": self._goal.copy()}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -MAX_ACTION, MAX_ACTION)
        self._position = self._position + action
        dx, dy = self._position - self._goal
        distance = float(np.hypot(dx, dy))
        reward = -distance
        terminated = distance < GOAL_TOLERANCE
        info = {"distance": distance, "reward_distance": reward}
        return self._position.astype(np.float32), reward, terminated, False, info


class Navigation2DVectorEnv(MetaEnv, VectorEnv):
    """``num_envs`` Navigation2D envs, each with its own task, stepped in one array operation.

    Same dynamics, rewards, termination (within 0.01 of the goal) and truncation (at
    ``max_episode_steps``) as ``num_envs`` :class:`Navigation2DEnv` in a ``SyncVectorEnv``, with
    gymnasium's default next-step autoreset: the step after an episode ends resets that env
    (its action is ignored, its reward is 0). ``set_tasks`` gives every env its task;
    ``sample_tasks`` draws from ``self.np_random`` (seeded by ``reset(seed=...)``).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self, num_envs: int, *, goal_range: tuple[float, float] = (-0.5, 0.5), max_episode_steps: int = 100
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.task_spec = navigation_spec(goal_range)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.single_action_space = gym.spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._positions = np.zeros((num_envs, 2))
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self.set_tasks([{"goal": [0.0, 0.0]}] * num_envs)

    def set_tasks(self, tasks: list[dict[str, Any]], *, allow_out_of_range: bool = False) -> None:
        """One task per env (validated like ``set_task``)."""
        if len(tasks) != self.num_envs:
            raise ValueError(f"set_tasks needs {self.num_envs} tasks (one per env), got {len(tasks)}")
        checked: dict[int, dict[str, Any]] = {}  # each distinct task object is validated once
        for t in tasks:
            if id(t) not in checked:
                checked[id(t)] = self.task_spec.validate(t, allow_out_of_range=allow_out_of_range)
        validated = [checked[id(t)] for t in tasks]
        self._goals = np.array([t["goal"] for t in validated], dtype=np.float64)
        self._tasks = validated

    def get_tasks(self) -> list[dict[str, Any]]:
        return [{"goal": list(t["goal"])} for t in self._tasks]

    def set_task(self, task: dict[str, Any], *, allow_out_of_range: bool = False) -> None:
        """The same task in every env."""
        self.set_tasks([task] * self.num_envs, allow_out_of_range=allow_out_of_range)

    def get_task(self) -> dict[str, Any]:
        return self.get_tasks()[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._positions[:] = 0.0
        self._steps[:] = 0
        self._autoreset[:] = False
        return self._positions.astype(np.float32), {"goal": self._goals.copy()}

    def step(self, actions):
        actions = np.clip(np.asarray(actions, dtype=np.float64), -MAX_ACTION, MAX_ACTION)
        restart = self._autoreset
        running = ~restart
        self._positions = np.where(restart[:, None], 0.0, self._positions + actions)
        self._steps = np.where(restart, 0, self._steps + 1)
        delta = self._positions - self._goals
        distance = np.hypot(delta[:, 0], delta[:, 1])  # the same arithmetic as Navigation2DEnv
        rewards = np.where(running, -distance, 0.0)
        terminated = running & (distance < GOAL_TOLERANCE)
        truncated = running & (self._steps >= self.max_episode_steps)
        self._autoreset = terminated | truncated
        infos = {"distance": distance, "_distance": running}
        return self._positions.astype(np.float32), rewards, terminated, truncated, infos
