"""Step many Meta-World envs together: Meta-World's step with its overhead removed, quaternions batched.

:class:`MetaWorldBatch` holds ``N`` :class:`envs.metaworld_tasks.MetaWorldEnv` (each with its task)
and replaces their ``step`` with the same computation, reorganised:

1. **Physics, per env** (on ``threads`` threads; MuJoCo releases the GIL): the mocap target from
   the action (clipped, scaled, bounded as ``SawyerXYZEnv.set_xyz_action``), the gripper control,
   ``frame_skip`` MuJoCo steps, ``mj_rnePostConstraint``, ``mj_forward``, exactly
   as ``SawyerXYZEnv.step`` and gymnasium's ``MujocoEnv.do_simulation`` do, minus their checks,
   per-step allocations and the target-site writes that ``mj_forward`` overwrites.
2. **Observation**: the hand position, the gripper opening and the object positions read as
   ``SawyerXYZEnv._get_curr_obs_combined_no_goal`` does, from cached body ids instead of name
   lookups; each env class's own ``_get_pos_objects`` and ``_get_quat_objects`` (Meta-World's code,
   called as is). Most classes convert a geom's rotation matrix with SciPy's
   ``Rotation.from_matrix(m).as_quat()``, which costs about as much as the physics when called for
   one matrix: during this phase the name ``Rotation`` in those classes' modules is bound to a
   recorder that collects the matrices, and one ``Rotation.from_matrix`` call on all of them (the
   same SciPy arithmetic per matrix) fills the quaternions in. The observation is then frame-stacked,
   goal-masked and clipped as in ``SawyerXYZEnv._get_obs`` and ``step``.
3. **Reward and success, per env**: each class's own ``evaluate_state(obs, action)``. These are
   Python functions of one env's state, different for every class; batching them would mean
   rewriting Meta-World's reward code, so they stay Meta-World's, one call per env. One helper they
   call is replaced: ``SawyerXYZEnv.touching_object`` (is each gripper pad pressing on the object?,
   the grasp test of 14 classes, push-v3 and pick-place-v3 among them) walks every contact of the
   step twice in Python, a third of push-v3's step; the batch's envs answer it from the contact
   arrays in NumPy (:func:`_touching_object`), summing the same forces in the same order.

Resets go through ``MetaWorldEnv.reset`` (Meta-World's own reset, hand reset included). The tests
check that observations, rewards, success flags and truncations equal ``MetaWorldEnv.step``'s for
every ML1 and ML10 task over whole episodes, resets and task changes included.

Not thread-safe with respect to other threads stepping Meta-World envs in the same process while a
batch computes observations (the ``Rotation`` binding is swapped for that phase, then restored).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

import mujoco
import numpy as np
from scipy.spatial.transform import Rotation

from envs.batched import close_batch, run_split

_MOCAP_QUAT = np.array([1, 0, 1, 0])


class _RecordedRotation:
    """``Rotation.from_matrix(m).as_quat()`` that records ``m`` and returns NaNs to be filled in."""

    __slots__ = ("_matrix", "_sink")

    def __init__(self, sink: list[np.ndarray]) -> None:
        self._sink = sink
        self._matrix = None

    def from_matrix(self, matrix, *args, **kwargs) -> _RecordedRotation:
        if args or kwargs:
            raise _Unsupported
        matrix = np.array(matrix, dtype=np.float64)
        if matrix.shape != (3, 3):
            raise _Unsupported
        one = _RecordedRotation(self._sink)
        one._matrix = matrix
        return one

    def as_quat(self, *args, **kwargs) -> np.ndarray:
        if args or kwargs or self._matrix is None:
            raise _Unsupported
        self._sink.append(self._matrix)
        return np.full(4, np.nan)


class _Unsupported(Exception):
    """A use of ``Rotation`` the recorder does not cover: that env's quaternions are computed directly."""


class _ClassInfo:
    """What the batch caches per Meta-World env class (ids, bounds, the module that names ``Rotation``)."""

    def __init__(self, env: Any) -> None:
        model = env.model
        self.hand = model.body("hand").id
        self.right = model.body("rightclaw").id
        self.left = model.body("leftclaw").id
        self.pads = (model.geom("leftpad_geom").id, model.geom("rightpad_geom").id)
        space = env.sawyer_observation_space
        self.low, self.high = space.low, space.high
        self.obj_max_len = int(env._obs_obj_max_len)
        module = sys.modules[type(env).__module__]
        self.module = module if getattr(module, "Rotation", None) is Rotation else None


class MetaWorldBatch:
    """``N`` :class:`~envs.metaworld_tasks.MetaWorldEnv` stepped together (see the module docstring).

    Args:
        envs: the envs (any tasks; an env's Meta-World class follows its task).
        threads: threads stepping the physics (1: in the calling thread).
    """

    def __init__(self, envs: Sequence[Any], *, threads: int = 1) -> None:
        if not envs:
            raise ValueError("MetaWorldBatch needs at least one env")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self.threads = min(threads, self.num_envs)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._info: dict[type, _ClassInfo] = {}
        self.success = np.zeros(self.num_envs, dtype=np.float32)  # info["success"] of the last step

    def _class_info(self, env: Any) -> _ClassInfo:
        info = self._info.get(type(env))
        if info is None:
            info = self._info[type(env)] = _ClassInfo(env)
        return info

    def set_tasks(self, tasks: Sequence[dict[str, Any]], *, allow_out_of_range: bool = True) -> None:
        if len(tasks) != self.num_envs:
            raise ValueError(f"set_tasks needs {self.num_envs} tasks (one per env), got {len(tasks)}")
        for env, task in zip(self.envs, tasks):
            env.set_task(task, allow_out_of_range=allow_out_of_range)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Reset every env with ``MetaWorldEnv.reset(seed=...)``: observations ``[N, 39]``."""
        return np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(self.envs, seeds)])

    # ------------------------------------------------------------------ stepping

    def _physics(self, index: np.ndarray, actions: np.ndarray) -> None:
        envs = self.envs
        deltas = np.clip(actions[:, :3], -1, 1)  # SawyerXYZEnv.set_xyz_action's clip, for all envs at once
        for i in index:
            env = envs[i]._env
            data, model = env.data, env.model
            # the rest of SawyerXYZEnv.set_xyz_action: scale, move the mocap, keep it in bounds
            new_mocap_pos = data.mocap_pos + deltas[i] * env.action_scale
            hand = new_mocap_pos[0]
            np.minimum(np.maximum(hand, env.mocap_low, out=hand), env.mocap_high, out=hand)  # np.clip's arithmetic
            data.mocap_pos = new_mocap_pos
            data.mocap_quat = _MOCAP_QUAT
            # MujocoEnv.do_simulation([a[-1], -a[-1]], frame_skip)
            grip = actions[i, -1]
            data.ctrl[:] = (grip, -grip)
            mujoco.mj_step(model, data, nstep=env.frame_skip)
            mujoco.mj_rnePostConstraint(model, data)
            env.curr_path_length += 1
            # SawyerXYZEnv.step writes the target sites' positions (data.site(name).xpos) here; the
            # mj_forward below recomputes every site position from the model, so that write has no
            # effect on anything the step returns and is left out.
            mujoco.mj_forward(model, data)

    def step(self, actions: np.ndarray, running: np.ndarray | None = None):
        """One control step of the running envs (all if ``running`` is None).

        ``actions``: ``[N, 4]``, converted to float32 as ``MetaWorldEnv.step`` does. Returns
        ``(obs [N, 39], reward [N], terminated [N], truncated [N], infos)`` where ``infos[i]`` is
        Meta-World's info dict of env ``i`` (None for envs that did not run). Rows of envs that
        did not run hold zeros.
        """
        actions = np.asarray(actions, dtype=np.float32)
        n = self.num_envs
        index = np.arange(n) if running is None else np.flatnonzero(running)
        for i in index:
            env = self.envs[i]
            if env._needs_reset:
                raise RuntimeError("MetaWorldBatch: reset() the envs before step(), after construction and set_task()")
            if env._env._did_see_sim_exception:  # never set by Meta-World v3; keep its own path if it is
                raise RuntimeError("MetaWorldBatch: a Meta-World env saw a simulation exception")
        run_split(self._pool, self.threads, self._physics, index, actions)

        current = self._current_observations(index)
        k_envs = len(index)
        stacked = np.empty((k_envs, 39))
        low, high = np.empty((k_envs, 39)), np.empty((k_envs, 39))
        for k, i in enumerate(index):
            env = self.envs[i]._env
            info = self._class_info(env)
            # SawyerXYZEnv._get_obs: frame stacking, the goal zeros when partially observable
            goal = env._get_pos_goal()
            if env._partially_observable:
                goal = np.zeros_like(goal)
            stacked[k, :18] = current[k]
            stacked[k, 18:36] = env._prev_obs
            stacked[k, 36:] = goal
            env._prev_obs = current[k]
            low[k], high[k] = info.low, info.high
        stable = np.clip(stacked, a_max=high, a_min=low, dtype=np.float64)  # SawyerXYZEnv.step's clip

        obs = np.zeros((n, 39))
        obs[index] = stable
        reward = np.zeros(n)
        truncated = np.zeros(n, dtype=bool)
        infos: list[dict[str, Any] | None] = [None] * n
        for k, i in enumerate(index):
            wrapper = self.envs[i]
            env = wrapper._env
            env._last_stable_obs = stable[k].copy()
            if "touching_object" not in env.__dict__:  # a class built since (ML10/ML45 task changes)
                # through a weak proxy: the env holding a partial of itself would be a reference cycle,
                # and a dropped env (21 MB) would wait for the cyclic collector (ML10 grew 2 GB/iteration)
                env.touching_object = partial(_touching_object, weakref.proxy(env), self._class_info(env).pads)
            r, step_info = env.evaluate_state(env._last_stable_obs, actions[i])
            wrapper._elapsed += 1
            limit = wrapper.max_path_length
            truncated[i] = limit is not None and wrapper._elapsed >= limit
            reward[i] = float(r)
            infos[i] = step_info
            self.success[i] = float(step_info.get("success", 0.0))
        return obs, reward, np.zeros(n, dtype=bool), truncated, infos

    def _current_observations(self, index: np.ndarray) -> list[np.ndarray]:
        """``SawyerXYZEnv._get_curr_obs_combined_no_goal`` of the envs in ``index`` (18 floats each)."""
        matrices: list[np.ndarray] = []
        recorder = _RecordedRotation(matrices)
        rows: list[np.ndarray] = []
        pending: list[tuple[int, np.ndarray, int]] = []  # (row, positions of the NaNs, matrices before)
        modules = {info.module for info in self._info.values() if info.module is not None}
        for i in index:
            modules.add(self._class_info(self.envs[i]._env).module)
        modules.discard(None)
        saved = {m: m.Rotation for m in modules}
        try:
            for m in modules:
                m.Rotation = recorder
            for i in index:
                env = self.envs[i]._env
                info = self._class_info(env)
                xpos = env.data.xpos
                apart = xpos[info.right] - xpos[info.left]
                gripper = min(max(math.sqrt(apart.dot(apart)) / 0.1, 0.0), 1.0)  # np.linalg.norm of a vector
                before = len(matrices)
                try:
                    obj_pos = env._get_pos_objects()
                    obj_quat = env._get_quat_objects()
                except _Unsupported:
                    del matrices[before:]
                    with _rotation(m for m in saved if m is info.module):
                        obj_pos = env._get_pos_objects()
                        obj_quat = env._get_quat_objects()
                row = np.zeros(4 + info.obj_max_len)
                row[:3] = xpos[info.hand]
                row[3] = gripper
                # obs_obj_padded: (pos, quat) of each object in turn, zero-padded
                pos, quat = np.asarray(obj_pos, dtype=np.float64), np.asarray(obj_quat, dtype=np.float64)
                for k in range(len(pos) // 3):
                    row[4 + 7 * k : 7 + 7 * k] = pos[3 * k : 3 * k + 3]
                    row[7 + 7 * k : 11 + 7 * k] = quat[4 * k : 4 * k + 4]
                calls = len(matrices) - before
                if calls:
                    nan_at = np.flatnonzero(np.isnan(row))
                    if nan_at.size != 4 * calls:  # a class that computes on its quaternion: redo it directly
                        del matrices[before:]
                        with _rotation(m for m in saved if m is info.module):
                            row = np.asarray(env._get_curr_obs_combined_no_goal(), dtype=np.float64)
                    else:
                        pending.append((len(rows), nan_at, before))
                rows.append(row)
        finally:
            for m, original in saved.items():
                m.Rotation = original
        if matrices:
            quats = Rotation.from_matrix(np.stack(matrices)).as_quat()
            for row, nan_at, before in pending:
                count = nan_at.size // 4
                rows[row][nan_at] = quats[before : before + count].ravel()
        return rows

    def close(self) -> None:
        close_batch(self)


def _touching_object(env: Any, pads: tuple[int, int], object_geom_id: int) -> bool:
    """``SawyerXYZEnv.touching_object`` from the contact arrays: both pads press on the object.

    A pad presses when the normal forces of its contacts with the object (``efc_force`` at each
    contact's ``efc_address``) sum to more than 0; the sum runs over the same contacts in the same
    order as Meta-World's, so the result is the same bit for bit.
    """
    data = env.data
    if data.ncon == 0:
        return False
    geom = data.contact.geom  # [ncon, 2]
    with_object = (geom == object_geom_id).any(axis=1)
    force = data.efc_force[data.contact.efc_address]
    return all(sum(force[with_object & (geom == pad).any(axis=1)]) > 0 for pad in pads)


@contextmanager
def _rotation(modules):
    """Bind ``Rotation`` back to SciPy's in ``modules`` for the duration (a direct computation)."""
    modules = list(modules)
    swapped = {m: m.Rotation for m in modules}
    try:
        for m in modules:
            m.Rotation = Rotation
        yield
    finally:
        for m, value in swapped.items():
            m.Rotation = value
