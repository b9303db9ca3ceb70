"""Randomised-dynamics MuJoCo families: the "rand-params" tasks of ProMP and PEARL.

``HalfCheetahRandParamsEnv``, ``HopperRandParamsEnv`` and ``Walker2dRandParamsEnv`` are
gymnasium's v5 ``HalfCheetahEnv``, ``HopperEnv`` and ``Walker2dEnv`` (observations, reward,
termination and reset noise unchanged) whose task rescales the physical parameters of the
MuJoCo model:

=================  ==========================================  ==============
task field         model entries it scales (one exponent each)  scale
=================  ==========================================  ==============
``body_mass``      ``model.body_mass``: one per body            ``1.5 ** u``
``body_inertia``   ``model.body_inertia``: one per body *and*   ``1.5 ** u``
                   principal axis (as ProMP and PEARL do)
``geom_friction``  ``model.geom_friction``: one per geom and    ``1.5 ** u``
                   coefficient (sliding, torsional, rolling)
``dof_damping``    ``model.dof_damping``: one per dof           ``1.3 ** u``
=================  ==========================================  ==============

**Task format.** A task is a JSON-serialisable dict of the log-scale exponents ``u``, one flat
list of floats per field, ``u ~ U[log_scale_range]`` (``[-3, 3]`` by default) independently per
entry. Entries whose nominal value is exactly zero are left out, since no scale can change
them: the world body's mass and inertia, and the damping of the three (undamped) root dofs of
these planar robots. Lists follow the model's order: ``body_mass`` is bodies 1.. in order,
``body_inertia`` is body-major (``[b1_axis0, b1_axis1, b1_axis2, b2_axis0, ...]``),
``geom_friction`` is geom-major (``[g0_slide, g0_spin, g0_roll, g1_slide, ...]``) and
``dof_damping`` lists the damped dofs in order. ``env.task_entry_names`` names every entry
(``"torso"``, ``"torso/1"``, ``"floor/slide"``, ``"bthigh"``...). For the shipped models:

- HalfCheetah: 7 masses, 21 inertias, 27 frictions (9 geoms), 6 dampings;
- Hopper: 4 masses, 12 inertias, 15 frictions (5 geoms), 3 dampings;
- Walker2d: 7 masses, 21 inertias, 24 frictions (8 geoms), 6 dampings.

The default task is all zeros: the nominal model, exactly the parent env.

**Applying a task.** ``_apply_task`` writes every scaled array as ``nominal * scale`` from a
copy of the nominal parameters taken at construction, never from the previous task's values,
so the model depends only on the current task (all zeros restores the nominal model bit for
bit). It then recomputes MuJoCo's derived constants with ``mj_setConst`` (subtree masses,
``body_invweight0``/``dof_invweight0`` used by the constraint solver's regularisation,
``dof_M0``, ``actuator_acc0``, ``stat.meaninertia`` used by the solver's tolerance, the
tracking camera's COM offset), so the model is the one MuJoCo would compile from the XML with
the scaled values; on the nominal parameters this reproduces the compiled model exactly. The
constants are computed on a private scratch ``MjData``, so ``set_task`` mid-episode leaves
the simulation state alone: the next step simply uses the new dynamics. (ProMP and PEARL did
not recompute the derived constants.)

Notes on the physics, MuJoCo's not ours: a contact uses the element-wise maximum of the two
geoms' frictions and the larger ``condim``. These models use ``condim`` 3, so only the sliding
coefficient matters (the torsional and rolling exponents are kept, as in ProMP, but have no
effect), and lowering a robot geom's friction below the floor's does nothing. Per-axis inertia
scaling can give principal inertias violating ``A + B >= C``, which MuJoCo's compiler would
refuse but simulates without complaint (as in ProMP and PEARL).

Registration ids (done in :mod:`envs`): ``metarl/<name>-v0`` for each key of
:data:`RAND_PARAMS_ENVS`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import mujoco
import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from envs.base import MetaEnv, TaskField, TaskSpec

#: Base of the scale ``base ** u`` for each task field (ProMP's ``log_scale_limit`` bases).
SCALE_BASES: dict[str, float] = {
    "body_mass": 1.5,
    "body_inertia": 1.5,
    "geom_friction": 1.5,
    "dof_damping": 1.3,
}
PARAMETERS = tuple(SCALE_BASES)

_FIELD_DOCS = {
    "body_mass": "log-{base} scale of each body's mass (bodies with nonzero mass, in model order)",
    "body_inertia": "log-{base} scale of each body's principal inertias, body-major (3 per body)",
    "geom_friction": "log-{base} scale of each geom's (sliding, torsional, rolling) friction, geom-major",
    "dof_damping": "log-{base} scale of each damped dof's damping (dofs with nonzero damping)",
}

RAND_PARAMS_ENVS: dict[str, str] = {
    "HalfCheetahRandParams": "envs.rand_params:HalfCheetahRandParamsEnv",
    "HopperRandParams": "envs.rand_params:HopperRandParamsEnv",
    "Walker2dRandParams": "envs.rand_params:Walker2dRandParamsEnv",
}


def _check_log_scale_range(log_scale_range: Any) -> tuple[float, float]:
    try:
        low, high = log_scale_range
    except (TypeError, ValueError):
        raise ValueError(f"log_scale_range must be a pair (low, high), got {log_scale_range!r}") from None
    numbers = []
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"log_scale_range must be two finite numbers, got {log_scale_range!r}")
        numbers.append(float(v))
    if numbers[0] > numbers[1]:
        raise ValueError(f"log_scale_range must have low <= high, got {log_scale_range!r}")
    return numbers[0], numbers[1]


def _name(model: mujoco.MjModel, obj: mujoco.mjtObj, index: int, prefix: str) -> str:
    return mujoco.mj_id2name(model, obj, index) or f"{prefix}{index}"


def _entry_names(model: mujoco.MjModel) -> dict[str, list[str]]:
    """A label for every entry (flattened, model order) of each scaled array."""
    bodies = [_name(model, mujoco.mjtObj.mjOBJ_BODY, i, "body") for i in range(model.nbody)]
    geoms = [_name(model, mujoco.mjtObj.mjOBJ_GEOM, i, "geom") for i in range(model.ngeom)]
    dofs = [_name(model, mujoco.mjtObj.mjOBJ_JOINT, int(model.dof_jntid[i]), "joint") for i in range(model.nv)]
    return {
        "body_mass": bodies,
        "body_inertia": [f"{b}/{axis}" for b in bodies for axis in range(3)],
        "geom_friction": [f"{g}/{kind}" for g in geoms for kind in ("slide", "spin", "roll")],
        "dof_damping": dofs,
    }


class RandParamsMixin(MetaEnv):
    """The rand-params task on top of a gymnasium MuJoCo env (put it first in the bases).

    After construction: ``task_spec`` (sized from the loaded model), ``task_entry_names``
    (field -> label of each task entry), ``nominal_parameters()`` (copies of the nominal arrays).
    """

    def __init__(
        self,
        *,
        log_scale_range: tuple[float, float] = (-3.0, 3.0),
        task: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        low, high = _check_log_scale_range(log_scale_range)
        super().__init__(**kwargs)  # the gymnasium env (MetaEnv has no __init__)
        self._rand_params_kwargs = {"log_scale_range": (low, high), **kwargs}

        model = self.model
        self._nominal = {name: np.array(getattr(model, name), dtype=np.float64, copy=True) for name in PARAMETERS}
        # Flat indices of the entries a task scales: those whose nominal value is nonzero.
        self._entries = {name: np.flatnonzero(self._nominal[name].ravel() != 0.0) for name in PARAMETERS}
        all_names = _entry_names(model)
        self.task_entry_names = {name: [all_names[name][i] for i in self._entries[name]] for name in PARAMETERS}
        self.task_spec = TaskSpec(
            tuple(
                TaskField(
                    name,
                    low,
                    high,
                    size=int(self._entries[name].size),
                    doc=_FIELD_DOCS[name].format(base=SCALE_BASES[name]),
                )
                for name in PARAMETERS
            )
        )
        self._scratch_data = mujoco.MjData(model)  # mj_setConst's workspace, not the sim state

        if task is None:
            with warnings.catch_warnings():  # the nominal model is a fine default for any range
                warnings.simplefilter("ignore")
                self.set_task(self.nominal_task(), allow_out_of_range=True)
        else:
            self.set_task(task, allow_out_of_range=True)

    def nominal_task(self) -> dict[str, list[float]]:
        """The all-zeros task: the unmodified model."""
        return {name: [0.0] * int(self._entries[name].size) for name in PARAMETERS}

    def nominal_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the nominal ``body_mass``, ``body_inertia``, ``geom_friction``, ``dof_damping``."""
        return {name: value.copy() for name, value in self._nominal.items()}

    def _apply_task(self, task: dict[str, Any]) -> None:
        model = self.model
        for name in PARAMETERS:
            nominal = self._nominal[name]
            scale = np.ones(nominal.size)
            scale[self._entries[name]] = SCALE_BASES[name] ** np.asarray(task[name], dtype=np.float64)
            getattr(model, name)[...] = nominal * scale.reshape(nominal.shape)
        mujoco.mj_setConst(model, self._scratch_data)

    def __getstate__(self) -> dict[str, Any]:
        # EzPickle (the parent's pickling) rebuilds the env from constructor arguments; rebuild
        # it with the current task too. The simulation state is not kept (as for the parent).
        return {"_ezpickle_args": (), "_ezpickle_kwargs": {**self._rand_params_kwargs, "task": self.get_task()}}


class HalfCheetahRandParamsEnv(RandParamsMixin, HalfCheetahEnv):
    """gymnasium's HalfCheetah-v5 with randomised masses, inertias, frictions and dampings.

    Keyword-only: ``log_scale_range`` (default ``(-3, 3)``), ``task`` (default: the nominal
    model), and the parent's keyword arguments (``render_mode``, ``ctrl_cost_weight``...).
    """


class HopperRandParamsEnv(RandParamsMixin, HopperEnv):
    """gymnasium's Hopper-v5 with randomised masses, inertias, frictions and dampings.

    Keyword-only: ``log_scale_range`` (default ``(-3, 3)``), ``task`` (default: the nominal
    model), and the parent's keyword arguments (``render_mode``, ``healthy_reward``...).
    """


class Walker2dRandParamsEnv(RandParamsMixin, Walker2dEnv):
    """gymnasium's Walker2d-v5 with randomised masses, inertias, frictions and dampings.

    Keyword-only: ``log_scale_range`` (default ``(-3, 3)``), ``task`` (default: the nominal
    model), and the parent's keyword arguments (``render_mode``, ``healthy_reward``...).
    """
