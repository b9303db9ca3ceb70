"""Goal- and direction-conditioned MuJoCo locomotion (the MAML / ProMP / PEARL benchmarks).

Every family is a thin subclass of gymnasium's v5 MuJoCo env that changes the **reward
only**: the model, the physics, the observation, the reset noise and the termination rule
are the parent's, so ``obs`` from ``HalfCheetahVelEnv`` equal those of
``gymnasium.make("HalfCheetah-v5", ctrl_cost_weight=0.05)`` step for step under the same
seed and actions. A task only stores reward parameters (``_apply_task`` touches no model).

Families, tasks and rewards (``x_velocity``/``y_velocity`` are the parent's finite
differences of the main body's position over one env step, ``dt = 0.05``):

- ``HalfCheetahVel``: task ``{"velocity": v}``, v ~ U[0, 2];
  reward ``-|x_velocity - v| - 0.05 * |a|^2``.
- ``HalfCheetahDir``: task ``{"direction": d}``, d in {-1, 1};
  reward ``d * x_velocity - 0.05 * |a|^2``.
- ``AntVel``: task ``{"velocity": v}``, v ~ U[0, 3];
  reward ``-|x_velocity - v| + healthy - ctrl - contact``.
- ``AntDir``: task ``{"direction": d}``, d in {-1, 1};
  reward ``d * x_velocity + healthy - ctrl - contact``.
- ``AntDir2D``: task ``{"direction": [cos a, sin a]}``, a ~ U[0, 2π) (unit length required);
  reward ``direction · (x_velocity, y_velocity) + healthy - ctrl - contact``.
- ``AntGoal``: task ``{"goal": [gx, gy]}``, goal ~ U[-3, 3]^2;
  reward ``-(|x - gx| + |y - gy|) + healthy - ctrl - contact``.

Constants and the references they follow:

- HalfCheetah control cost weight **0.05** (``0.5 * 1e-1`` in MAML's rllab
  ``half_cheetah_env_rand*.py``, ported unchanged by pytorch-maml-rl and ProMP's
  ``half_cheetah_rand_vel.py``), instead of gymnasium v5's default 0.1; passed through the
  parent's ``ctrl_cost_weight`` argument (override it with ``ctrl_cost_weight=...``). Target
  velocities U[0, 2] as in the MAML paper (ProMP uses U[0, 3]).
- Ant: gymnasium v5's own terms are kept unchanged (``healthy_reward=1``, ``ctrl_cost_weight=0.5``,
  ``contact_cost_weight=5e-4``, contact forces clipped to [-1, 1], healthy z in [0.2, 1.0],
  ``terminate_when_unhealthy=True``); only the forward term is replaced by the task's term.
  These equal ProMP's ``ant_rand_direc*.py`` constants (ctrl 0.5, contact 0.5e-3, survive 1).
  AntVel penalises the x velocity only (y is free), as in MAML's ant velocity task.
- AntGoal: L1 distance of the torso's (x, y) (``qpos[0:2]``, the ``x_position``/``y_position``
  in ``info``) to the goal, as in ProMP's ``ant_rand_goal.py`` and PEARL's ``ant_goal.py``;
  goals are uniform on the square [-3, 3]^2 (ProMP/PEARL draw from the disc of radius 3;
  they also use the torso's ``xpos``, which after ``mj_step`` lags ``qpos`` by one physics
  substep, and control weight 0.1 with no survive bonus).
  Unlike the other Ant families it sets ``exclude_current_positions_from_observation=False``
  by default, so the observation starts with the torso's (x, y) and the agent can know where
  it is relative to the goal (107-dim observation instead of 105).

  Termination: ProMP/PEARL's ant-goal never terminate ("make it happy, not suicidal"): with
  goals ~3 away (L1) the per-step reward is mostly negative, so an env that ends the episode
  when the torso leaves the healthy z range pays the agent for falling over. AntGoal therefore
  defaults to ``terminate_when_unhealthy=False`` (episodes always run to the horizon; the
  healthy bonus is still paid only while healthy). Pass ``terminate_when_unhealthy=True`` for
  gymnasium's rule. The other Ant families keep the parent's termination (their forward terms
  are positive when the task is solved, as in gymnasium's Ant).

``info`` holds the parent's entries (``x_position``, ``x_velocity``, and for the Ant
``y_position``, ``y_velocity``, ``distance_from_origin``, ``reward_ctrl``, ``reward_contact``,
``reward_survive``) plus the task's term: ``reward_velocity``, ``reward_direction`` or
``reward_goal`` (the parent's ``reward_forward`` is dropped because it is not part of the
reward). ``reward == reward_<task term> + reward_ctrl (+ reward_survive + reward_contact)``.

Register with ``gymnasium.register(id=f"metarl/{name}-v0", entry_point=LOCOMOTION_ENVS[name],
max_episode_steps=200)``. Reach ``sample_tasks``/``set_task``/``get_task`` through
``env.unwrapped`` (or ``env.get_wrapper_attr``): gymnasium 1.x wrappers no longer forward
attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from envs.base import InvalidTask, MetaEnv, TaskField, TaskSpec

HALF_CHEETAH_CTRL_COST_WEIGHT = 0.05  # MAML / pytorch-maml-rl / ProMP: 0.5 * 1e-1
UNIT_TOLERANCE = 1e-6
DIRECTIONS = (-1, 1)

LOCOMOTION_ENVS: dict[str, str] = {
    "HalfCheetahVel": "envs.locomotion:HalfCheetahVelEnv",
    "HalfCheetahDir": "envs.locomotion:HalfCheetahDirEnv",
    "AntVel": "envs.locomotion:AntVelEnv",
    "AntDir": "envs.locomotion:AntDirEnv",
    "AntDir2D": "envs.locomotion:AntDir2DEnv",
    "AntGoal": "envs.locomotion:AntGoalEnv",
}


@dataclass(frozen=True)
class UnitVectorField(TaskField):
    """A vector of ``size`` numbers with Euclidean norm 1 (within ``tolerance``).

    Sampling draws an angle a ~ U[0, 2π) and gives ``[cos a, sin a]`` (``size`` must be 2).
    A vector that is not unit length is malformed, not merely out of range: it raises
    :class:`InvalidTask` even with ``allow_out_of_range=True``.
    """

    tolerance: float = UNIT_TOLERANCE

    def describe(self) -> str:
        return f"a unit vector of {self.size} numbers, [cos a, sin a] (norm 1 within {self.tolerance:g})"

    def sample(self, rng: np.random.Generator) -> list[float]:
        if self.size != 2:
            raise NotImplementedError("UnitVectorField samples 2-D directions only")
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        return [math.cos(angle), math.sin(angle)]

    def validate(self, value: Any, *, allow_out_of_range: bool) -> list[float]:
        # Shape, type and finiteness checks of a plain unbounded vector field (its messages
        # would describe the range as [-inf, inf], so rephrase them).
        try:
            numbers = TaskField(self.name, -math.inf, math.inf, size=self.size).validate(
                value, allow_out_of_range=False
            )
        except InvalidTask:
            raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}") from None
        norm = math.hypot(*numbers)
        if abs(norm - 1.0) > self.tolerance:
            raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r} with norm {norm:.6g}")
        return numbers


def _check_range(name: str, value_range: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{name} must be finite with low <= high, got {value_range!r}")
    return low, high


def _reject(kwargs: dict[str, Any], name: str, family: str, why: str) -> None:
    if name in kwargs:
        raise TypeError(f"{family} does not use {name}: {why}")


class _LocomotionTaskEnv(MetaEnv):
    """Shared constructor plumbing: task before the parent's ``__init__``, pickling by task."""

    # The task changes the reward only, never the MuJoCo model: envs of a family built with the
    # same arguments may share one MjModel (the samplers do, to keep 800 envs in cache).
    task_independent_model = True

    def _init_family(
        self,
        spec: TaskSpec,
        task: dict[str, Any] | None,
        default: dict[str, Any],
        pickle_kwargs: dict[str, Any],
        parent_kwargs: dict[str, Any],
    ) -> None:
        self.task_spec = spec
        # The task only sets reward parameters, so it can (and does) come first: a bad task
        # fails before the MuJoCo model is loaded.
        self.set_task(task if task is not None else default, allow_out_of_range=True)
        super().__init__(**parent_kwargs)  # type: ignore[call-arg]
        # The parent's EzPickle recorded *its* positional arguments, which our keyword-only
        # constructor does not take; record ours so copy/pickle rebuild this class.
        utils.EzPickle.__init__(self, **pickle_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        # Rebuild with the *current* task, not the one given to the constructor.
        return {**state, "_ezpickle_kwargs": {**state["_ezpickle_kwargs"], "task": self.get_task()}}


# --------------------------------------------------------------------------- HalfCheetah


class _HalfCheetahTaskEnv(_LocomotionTaskEnv, HalfCheetahEnv):
    """HalfCheetah-v5 whose ``_get_rew(x_velocity, action)`` is the task's reward."""

    def _init_cheetah(self, spec: TaskSpec, task, default, ctrl_cost_weight: float, pickle_kwargs, kwargs) -> None:
        pickle_kwargs = {**pickle_kwargs, "task": task, "ctrl_cost_weight": ctrl_cost_weight, **kwargs}
        self._init_family(spec, task, default, pickle_kwargs, {"ctrl_cost_weight": ctrl_cost_weight, **kwargs})


class HalfCheetahVelEnv(_HalfCheetahTaskEnv):
    """HalfCheetah running at a target forward velocity: ``-|x_velocity - v| - 0.05 |a|^2``."""

    def __init__(
        self,
        *,
        velocity_range: tuple[float, float] = (0.0, 2.0),
        task: dict[str, Any] | None = None,
        ctrl_cost_weight: float = HALF_CHEETAH_CTRL_COST_WEIGHT,
        **kwargs: Any,
    ) -> None:
        _reject(kwargs, "forward_reward_weight", "HalfCheetahVel", "its reward is -|x_velocity - velocity|")
        low, high = _check_range("velocity_range", velocity_range)
        spec = TaskSpec((TaskField("velocity", low, high, doc="target forward velocity (m/s)"),))
        self._init_cheetah(
            spec, task, {"velocity": (low + high) / 2}, ctrl_cost_weight, {"velocity_range": (low, high)}, kwargs
        )

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._target_velocity = task["velocity"]

    def _get_rew(self, x_velocity: float, action):
        reward_velocity = -abs(x_velocity - self._target_velocity)
        ctrl_cost = self.control_cost(action)
        reward = reward_velocity - ctrl_cost
        return reward, {"reward_velocity": reward_velocity, "reward_ctrl": -ctrl_cost}


class HalfCheetahDirEnv(_HalfCheetahTaskEnv):
    """HalfCheetah running forward (+1) or backward (-1): ``d * x_velocity - 0.05 |a|^2``.

    ``forward_reward_weight`` (default 1) scales the directional term, as in the parent.
    """

    def __init__(
        self,
        *,
        task: dict[str, Any] | None = None,
        ctrl_cost_weight: float = HALF_CHEETAH_CTRL_COST_WEIGHT,
        **kwargs: Any,
    ) -> None:
        spec = TaskSpec((TaskField("direction", choices=DIRECTIONS, doc="+1 forward, -1 backward"),))
        self._init_cheetah(spec, task, {"direction": 1}, ctrl_cost_weight, {}, kwargs)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._direction = task["direction"]

    def _get_rew(self, x_velocity: float, action):
        reward_direction = self._forward_reward_weight * self._direction * x_velocity
        ctrl_cost = self.control_cost(action)
        reward = reward_direction - ctrl_cost
        return reward, {"reward_direction": reward_direction, "reward_ctrl": -ctrl_cost}


# --------------------------------------------------------------------------- Ant


class _AntTaskEnv(_LocomotionTaskEnv, AntEnv):
    """Ant-v5 whose forward term is replaced by ``_task_reward(info)``.

    The parent's ``_get_rew`` only receives the x velocity, so the task term is computed
    after the parent's ``step`` from its ``info`` (x/y velocity and position); the healthy,
    control and contact terms and ``terminated`` are the parent's.
    """

    def _init_ant(self, spec: TaskSpec, task, default, pickle_kwargs, kwargs) -> None:
        self._init_family(spec, task, default, {**pickle_kwargs, "task": task, **kwargs}, kwargs)

    def _task_reward(self, info: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        raise NotImplementedError

    def step(self, action):
        observation, _parent_reward, terminated, truncated, info = super().step(action)
        task_reward, task_info = self._task_reward(info)
        reward = task_reward + info["reward_survive"] + info["reward_ctrl"] + info["reward_contact"]
        del info["reward_forward"]
        info.update(task_info)
        return observation, float(reward), terminated, truncated, info


class AntVelEnv(_AntTaskEnv):
    """Ant running at a target x velocity: ``-|x_velocity - v| + healthy - ctrl - contact``."""

    def __init__(
        self, *, velocity_range: tuple[float, float] = (0.0, 3.0), task: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        _reject(kwargs, "forward_reward_weight", "AntVel", "its reward is -|x_velocity - velocity|")
        low, high = _check_range("velocity_range", velocity_range)
        spec = TaskSpec((TaskField("velocity", low, high, doc="target x velocity (m/s)"),))
        self._init_ant(spec, task, {"velocity": (low + high) / 2}, {"velocity_range": (low, high)}, kwargs)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._target_velocity = task["velocity"]

    def _task_reward(self, info):
        reward_velocity = -abs(info["x_velocity"] - self._target_velocity)
        return reward_velocity, {"reward_velocity": reward_velocity}


class AntDirEnv(_AntTaskEnv):
    """Ant running along +x (+1) or -x (-1): ``d * x_velocity + healthy - ctrl - contact``.

    ``forward_reward_weight`` (default 1) scales the directional term, as in the parent.
    """

    def __init__(self, *, task: dict[str, Any] | None = None, **kwargs: Any) -> None:
        spec = TaskSpec((TaskField("direction", choices=DIRECTIONS, doc="+1 along +x, -1 along -x"),))
        self._init_ant(spec, task, {"direction": 1}, {}, kwargs)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._direction = task["direction"]

    def _task_reward(self, info):
        reward_direction = self._forward_reward_weight * self._direction * info["x_velocity"]
        return reward_direction, {"reward_direction": reward_direction}


class AntDir2DEnv(_AntTaskEnv):
    """Ant running along a planar unit direction: ``direction · xy_velocity + healthy - ctrl - contact``.

    Directions are sampled as ``[cos a, sin a]`` with a ~ U[0, 2π); ``set_task`` requires
    norm 1 within 1e-6. ``forward_reward_weight`` (default 1) scales the directional term.
    """

    def __init__(self, *, task: dict[str, Any] | None = None, **kwargs: Any) -> None:
        spec = TaskSpec((UnitVectorField("direction", -1.0, 1.0, size=2, doc="unit direction (x, y) to run along"),))
        self._init_ant(spec, task, {"direction": [1.0, 0.0]}, {}, kwargs)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._direction = np.asarray(task["direction"], dtype=np.float64)

    def _task_reward(self, info):
        dx, dy = self._direction
        reward_direction = self._forward_reward_weight * (dx * info["x_velocity"] + dy * info["y_velocity"])
        return reward_direction, {"reward_direction": reward_direction}


class AntGoalEnv(_AntTaskEnv):
    """Ant walking to a goal position: ``-(|x - gx| + |y - gy|) + healthy - ctrl - contact``.

    The observation includes the torso's (x, y) (``exclude_current_positions_from_observation``
    defaults to False here) and the episode does not end when the torso is unhealthy
    (``terminate_when_unhealthy`` defaults to False here); see the module docstring.
    """

    def __init__(
        self, *, goal_range: tuple[float, float] = (-3.0, 3.0), task: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        _reject(kwargs, "forward_reward_weight", "AntGoal", "its reward is minus the L1 distance to the goal")
        low, high = _check_range("goal_range", goal_range)
        kwargs.setdefault("exclude_current_positions_from_observation", False)
        kwargs.setdefault("terminate_when_unhealthy", False)
        spec = TaskSpec((TaskField("goal", low, high, size=2, doc="goal position (x, y)"),))
        self._init_ant(spec, task, {"goal": [(low + high) / 2] * 2}, {"goal_range": (low, high)}, kwargs)

    def _apply_task(self, task: dict[str, Any]) -> None:
        self._goal = np.asarray(task["goal"], dtype=np.float64)

    def _task_reward(self, info):
        distance = abs(info["x_position"] - self._goal[0]) + abs(info["y_position"] - self._goal[1])
        return -distance, {"reward_goal": -distance, "goal_distance": distance}
