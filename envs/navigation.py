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
        distance = float(np.linalg.norm(self._position - self._goal))
        reward = -distance
        terminated = distance < GOAL_TOLERANCE
        info = {"distance": distance, "reward_distance": reward}
        return self._position.astype(np.float32), reward, terminated, False, info
