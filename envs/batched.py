"""Step many MuJoCo locomotion envs of one family together: physics per env, the rest in NumPy.

:class:`PhysicsBatch` holds one unwrapped gymnasium env per slot (its ``MjModel``, its ``MjData``,
its task and its reset generator) and replaces the envs' ``step`` with:

1. the physics of every running env, ``frame_skip`` MuJoCo steps each (``mj_step(nstep=...)``
   on the env's own ``MjData``, so the solver's warm start carries over between control steps
   exactly as in the env), on ``threads`` threads (MuJoCo releases the GIL while it steps);
2. the family's observation, reward terms, ``info`` terms and termination computed for all envs
   at once in NumPy from the gathered ``qpos``, ``qvel`` (and, for the Ant, the torso's ``xpos``
   and the clipped external contact forces ``cfrc_ext``).

The gymnasium envs stay the reference and the public interface: the batch reads every constant
(weights, healthy ranges, observation options, ``dt``) from the envs themselves, so an env built
with other keyword arguments is batched with them, and the tests check that its episodes equal
the envs' own ``step`` for the same actions, term by term. Resets go through the env's own
``reset`` (one per episode, not per step: about 1% of a sampling call).

Why not ``mujoco.rollout``: it takes a batch of initial states and returns the states after
``nstep`` steps, but not the constraint solver's warm start (``qacc_warmstart``) each rollout ends
with. A control step per call then starts every env's solver cold, which the env never does; on
HalfCheetah that alone moves the state by 2.97 (max abs) after 200 control steps of the same
actions. Stepping each env's own ``MjData`` keeps the episodes the env's, bit for bit.

Only the Ant needs ``mj_rnePostConstraint`` after the step (its contact forces are in its
observation and reward); HalfCheetah, Hopper and Walker2d use nothing it computes, so the batch
skips it for them (it writes only derived quantities, never the state).

Families are found from the env's class: :func:`batched_kind` gives ``"cheetah"``, ``"ant"``,
``"hopper"`` or ``"walker2d"`` for the gymnasium v5 parents and the task term from the metarl
family (:class:`envs.locomotion` velocity, direction and goal tasks; the rand-params families
use the parent's own reward).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

_KINDS: tuple[tuple[type, str], ...] = (
    (HalfCheetahEnv, "cheetah"),
    (AntEnv, "ant"),
    (HopperEnv, "hopper"),
    (Walker2dEnv, "walker2d"),
)


def batched_kind(env: Any) -> str | None:
    """``"cheetah"``, ``"ant"``, ``"hopper"`` or ``"walker2d"`` when :class:`PhysicsBatch` can step
    this (unwrapped) env, else None. Envs that render to a window are stepped one by one."""
    if getattr(env, "render_mode", None) is not None:
        return None
    for cls, kind in _KINDS:
        if isinstance(env, cls):
            return kind
    return None


class PhysicsBatch:
    """``N`` envs of one locomotion family stepped together (see the module docstring).

    Args:
        envs: unwrapped envs of one class, built with the same keyword arguments; each keeps its
            own model (rand-params) or they share one (reward-only families), each its own data.
        threads: threads stepping the physics (1: in the calling thread).
    """

    def __init__(self, envs: Sequence[Any], *, threads: int = 1) -> None:
        if not envs:
            raise ValueError("PhysicsBatch needs at least one env")
        kinds = {batched_kind(env) for env in envs}
        if len(kinds) != 1 or None in kinds or len({type(env) for env in envs}) != 1:
            names = sorted({type(env).__name__ for env in envs})
            raise ValueError(f"PhysicsBatch needs envs of one batchable class, got {names}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.envs = list(envs)
        self.kind = kinds.pop()
        self.num_envs = n = len(self.envs)
        first = self.envs[0]
        self.frame_skip = int(first.frame_skip)
        self.dt = float(first.dt)
        self.threads = min(threads, n)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        nq, nv = first.model.nq, first.model.nv
        self.qpos = np.zeros((n, nq))
        self.qvel = np.zeros((n, nv))
        self._x_before = np.zeros(n)  # qpos[0] before the step (cheetah, hopper, walker2d)
        self._xy_before = np.zeros((n, 2))  # the Ant torso's xpos[:2] before / after the step
        self._xy_after = np.zeros((n, 2))
        self._cfrc = np.zeros((n, first.model.nbody, 6)) if self.kind == "ant" else None
        self._main_body = int(first.model.body(first._main_body).id) if self.kind == "ant" else 0
        self._task_params: dict[str, np.ndarray] = {}
        self._cache_views()
        self.refresh_tasks()

    # ------------------------------------------------------------------ tasks and resets

    def refresh_tasks(self) -> None:
        """Re-read the envs' task parameters (call after ``set_task`` on the envs)."""
        self._task_params = _task_params(self.envs)

    def set_tasks(self, tasks: Sequence[dict[str, Any]], *, allow_out_of_range: bool = True) -> None:
        if len(tasks) != self.num_envs:
            raise ValueError(f"set_tasks needs {self.num_envs} tasks (one per env), got {len(tasks)}")
        for env, task in zip(self.envs, tasks):
            env.set_task(task, allow_out_of_range=allow_out_of_range)
        self.refresh_tasks()

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Reset every env with its own ``reset(seed=...)``: observations ``[N, obs_dim]``."""
        self._cache_views()
        return np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(self.envs, seeds)])

    # ------------------------------------------------------------------ stepping

    def _cache_views(self) -> None:
        """Per env: (model, data, ctrl, qpos, qvel, xpos), the last four viewing the env's MjData.

        The bindings build a new array object at every attribute access (about 1 us each); the
        views stay valid as long as the env keeps its model and data objects (re-read at reset)."""
        self._views = [(e.model, e.data, e.data.ctrl, e.data.qpos, e.data.qvel, e.data.xpos) for e in self.envs]

    def _physics(self, index: np.ndarray, actions: np.ndarray, views) -> None:
        skip, step = self.frame_skip, mujoco.mj_step
        qpos, qvel, x_before = self.qpos, self.qvel, self._x_before
        if self.kind != "ant":
            for i in index:
                model, data, ctrl, qpos_i, qvel_i, _ = views[i]
                x_before[i] = qpos_i[0]
                ctrl[:] = actions[i]
                step(model, data, nstep=skip)
                qpos[i] = qpos_i
                qvel[i] = qvel_i
            return
        xy_before, xy_after, cfrc, body = self._xy_before, self._xy_after, self._cfrc, self._main_body
        post = mujoco.mj_rnePostConstraint
        for i in index:
            model, data, ctrl, qpos_i, qvel_i, xpos = views[i]
            xy_before[i] = xpos[body, :2]
            ctrl[:] = actions[i]
            step(model, data, nstep=skip)
            post(model, data)
            qpos[i] = qpos_i
            qvel[i] = qvel_i
            xy_after[i] = xpos[body, :2]
            cfrc[i] = data.cfrc_ext

    def step(self, actions: np.ndarray, running: np.ndarray | None = None):
        """One control step of the running envs (all if ``running`` is None).

        ``actions``: ``[N, act_dim]`` in the env's units (already inside its bounds).
        Returns ``(obs [N, obs_dim], reward [N], terminated [N], info)`` where ``info`` maps each
        term of the env's ``info`` to an ``[N]`` array. Rows of envs that did not run hold their
        last values; their rewards, flags and info are not meaningful.
        """
        actions = np.asarray(actions)
        index = np.arange(self.num_envs) if running is None else np.flatnonzero(running)
        run_split(self._pool, self.threads, self._physics, index, actions, self._views)
        return _TERMS[self.kind](self, actions)

    def close(self) -> None:
        close_batch(self)


def run_split(pool: ThreadPoolExecutor | None, threads: int, fn, index: np.ndarray, *args) -> None:
    """``fn(chunk, *args)`` over ``index`` split into ``threads`` contiguous chunks on ``pool``
    (in the calling thread when there is no pool or too few envs to share)."""
    if pool is None or index.size < 2 * threads:
        fn(index, *args)
        return
    for future in [pool.submit(fn, chunk, *args) for chunk in np.array_split(index, threads)]:
        future.result()


def close_batch(batch: Any) -> None:
    """Stop a batch's thread pool and close its envs."""
    if batch._pool is not None:
        batch._pool.shutdown()
        batch._pool = None
    for env in batch.envs:
        env.close()


# ---------------------------------------------------------------------- terms per family


def _ctrl_cost(env: Any, actions: np.ndarray) -> np.ndarray:
    return env._ctrl_cost_weight * np.sum(np.square(actions), axis=1)


def _cheetah(batch: PhysicsBatch, actions: np.ndarray):
    env, qpos, qvel = batch.envs[0], batch.qpos, batch.qvel
    x_velocity = (qpos[:, 0] - batch._x_before) / batch.dt
    start = 1 if env._exclude_current_positions_from_observation else 0
    obs = np.concatenate((qpos[:, start:], qvel), axis=1)
    ctrl_cost = _ctrl_cost(env, actions)
    info = {"x_position": qpos[:, 0].copy(), "x_velocity": x_velocity, "reward_ctrl": -ctrl_cost}
    task_reward, task_info = _task_term(batch, info, default_weight=env._forward_reward_weight)
    info.update(task_info)
    reward = task_reward - ctrl_cost
    return obs, reward, np.zeros(batch.num_envs, dtype=bool), info


def _ant(batch: PhysicsBatch, actions: np.ndarray):
    env, qpos, qvel = batch.envs[0], batch.qpos, batch.qvel
    xy_velocity = (batch._xy_after - batch._xy_before) / batch.dt
    low, high = env._contact_force_range
    contact = np.clip(batch._cfrc, low, high)
    min_z, max_z = env._healthy_z_range
    finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
    healthy = finite & (min_z <= qpos[:, 2]) & (qpos[:, 2] <= max_z)
    healthy_reward = healthy * env._healthy_reward
    ctrl_cost = _ctrl_cost(env, actions)
    contact_cost = env._contact_cost_weight * np.sum(np.square(contact).reshape(batch.num_envs, -1), axis=1)
    start = 2 if env._exclude_current_positions_from_observation else 0
    parts = [qpos[:, start:], qvel]
    if env._include_cfrc_ext_in_observation:
        parts.append(contact[:, 1:].reshape(batch.num_envs, -1))
    obs = np.concatenate(parts, axis=1)
    info = {
        "x_position": qpos[:, 0].copy(),
        "y_position": qpos[:, 1].copy(),
        "distance_from_origin": np.linalg.norm(qpos[:, 0:2], ord=2, axis=1),
        "x_velocity": xy_velocity[:, 0],
        "y_velocity": xy_velocity[:, 1],
        "reward_ctrl": -ctrl_cost,
        "reward_contact": -contact_cost,
        "reward_survive": healthy_reward,
    }
    task_reward, task_info = _task_term(batch, info, default_weight=env._forward_reward_weight)
    info.update(task_info)
    if "reward_forward" in task_info:  # gymnasium's own Ant: forward + healthy - (ctrl + contact)
        reward = (task_reward + healthy_reward) - (ctrl_cost + contact_cost)
    else:  # the metarl families: task term + survive + ctrl + contact (envs.locomotion._AntTaskEnv)
        reward = task_reward + healthy_reward + info["reward_ctrl"] + info["reward_contact"]
    terminated = ~healthy & bool(env._terminate_when_unhealthy)
    return obs, reward, terminated, info


def _planar_walker(batch: PhysicsBatch, actions: np.ndarray, healthy: np.ndarray):
    env, qpos, qvel = batch.envs[0], batch.qpos, batch.qvel
    x_velocity = (qpos[:, 0] - batch._x_before) / batch.dt
    start = 1 if env._exclude_current_positions_from_observation else 0
    obs = np.concatenate((qpos[:, start:], np.clip(qvel, -10, 10)), axis=1)
    forward_reward = env._forward_reward_weight * x_velocity
    healthy_reward = healthy * env._healthy_reward
    ctrl_cost = _ctrl_cost(env, actions)
    reward = (forward_reward + healthy_reward) - ctrl_cost
    info = {
        "x_position": qpos[:, 0].copy(),
        "z_distance_from_origin": qpos[:, 1] - env.init_qpos[1],
        "x_velocity": x_velocity,
        "reward_forward": forward_reward,
        "reward_ctrl": -ctrl_cost,
        "reward_survive": healthy_reward,
    }
    terminated = ~healthy & bool(env._terminate_when_unhealthy)
    return obs, reward, terminated, info


def _hopper(batch: PhysicsBatch, actions: np.ndarray):
    env, qpos = batch.envs[0], batch.qpos
    state = np.concatenate((qpos[:, 2:], batch.qvel), axis=1)
    min_state, max_state = env._healthy_state_range
    min_z, max_z = env._healthy_z_range
    min_angle, max_angle = env._healthy_angle_range
    healthy = (
        np.all((min_state < state) & (state < max_state), axis=1)
        & (min_z < qpos[:, 1])
        & (qpos[:, 1] < max_z)
        & (min_angle < qpos[:, 2])
        & (qpos[:, 2] < max_angle)
    )
    return _planar_walker(batch, actions, healthy)


def _walker2d(batch: PhysicsBatch, actions: np.ndarray):
    env, qpos = batch.envs[0], batch.qpos
    min_z, max_z = env._healthy_z_range
    min_angle, max_angle = env._healthy_angle_range
    healthy = (min_z < qpos[:, 1]) & (qpos[:, 1] < max_z) & (min_angle < qpos[:, 2]) & (qpos[:, 2] < max_angle)
    return _planar_walker(batch, actions, healthy)


_TERMS = {"cheetah": _cheetah, "ant": _ant, "hopper": _hopper, "walker2d": _walker2d}


# ---------------------------------------------------------------------- task terms


def _task_params(envs: Sequence[Any]) -> dict[str, np.ndarray]:
    """The task parameters of the metarl reward families as ``[N, ...]`` arrays (none otherwise)."""
    first = envs[0]
    for attr in ("_target_velocity", "_direction", "_goal"):
        if hasattr(first, attr) and hasattr(first, "task_spec"):
            return {attr: np.array([np.asarray(getattr(env, attr), dtype=np.float64) for env in envs])}
    return {}


def _task_term(batch: PhysicsBatch, info: dict[str, np.ndarray], *, default_weight: float):
    """The task's reward term ``[N]`` and its ``info`` entries, as the family's env defines it."""
    params = batch._task_params
    if "_target_velocity" in params:
        reward_velocity = -np.abs(info["x_velocity"] - params["_target_velocity"])
        return reward_velocity, {"reward_velocity": reward_velocity}
    if "_direction" in params:
        direction = params["_direction"]
        if direction.ndim == 2:  # AntDir2D: a unit vector
            along = direction[:, 0] * info["x_velocity"] + direction[:, 1] * info["y_velocity"]
            reward_direction = default_weight * along
        else:
            reward_direction = default_weight * direction * info["x_velocity"]
        return reward_direction, {"reward_direction": reward_direction}
    if "_goal" in params:
        goal = params["_goal"]
        distance = np.abs(info["x_position"] - goal[:, 0]) + np.abs(info["y_position"] - goal[:, 1])
        return -distance, {"reward_goal": -distance, "goal_distance": distance}
    forward_reward = default_weight * info["x_velocity"]
    return forward_reward, {"reward_forward": forward_reward}
