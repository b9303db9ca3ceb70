"""Tests for the rand-params families (envs/rand_params.py)."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest

from envs.base import InvalidTask, TaskOutOfRange
from envs.rand_params import (
    PARAMETERS,
    RAND_PARAMS_ENVS,
    HalfCheetahRandParamsEnv,
    HopperRandParamsEnv,
    Walker2dRandParamsEnv,
)

NAMESPACE = "metarl_test_rand_params"
FAMILIES = {  # name -> (class, parent id, expected field sizes)
    "HalfCheetahRandParams": (HalfCheetahRandParamsEnv, "HalfCheetah-v5", (7, 21, 27, 6)),
    "HopperRandParams": (HopperRandParamsEnv, "Hopper-v5", (4, 12, 15, 3)),
    "Walker2dRandParams": (Walker2dRandParamsEnv, "Walker2d-v5", (7, 21, 24, 6)),
}
BASES = {"body_mass": 1.5, "body_inertia": 1.5, "geom_friction": 1.5, "dof_damping": 1.3}


def env_id(name: str) -> str:
    return f"{NAMESPACE}/{name}-v0"


for _name, _entry_point in RAND_PARAMS_ENVS.items():
    if env_id(_name) not in gym.registry:
        gym.register(env_id(_name), entry_point=_entry_point, max_episode_steps=200)


def make(name: str, **kwargs) -> gym.Env:
    return gym.make(env_id(name), **kwargs)


def model_arrays(env: gym.Env) -> dict[str, np.ndarray]:
    """Every array field of the MuJoCo model, plus its statistics."""
    model = env.unwrapped.model
    arrays = {
        k: np.array(getattr(model, k))
        for k in dir(model)
        if not k.startswith("_") and isinstance(getattr(model, k), np.ndarray)
    }
    arrays["stat"] = np.array([model.stat.meaninertia, model.stat.meanmass, model.stat.meansize, model.stat.extent])
    return arrays


def assert_same_model(a: gym.Env, b: gym.Env) -> None:
    arrays_a, arrays_b = model_arrays(a), model_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    different = [k for k in arrays_a if not np.array_equal(arrays_a[k], arrays_b[k], equal_nan=True)]
    assert different == []


def rollout(env: gym.Env, seed: int, steps: int = 60):
    """Observations, rewards and flags under a fixed action sequence (resetting on termination)."""
    actions = np.random.default_rng(1234).uniform(-1.0, 1.0, size=(steps, *env.action_space.shape))
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
        trace.append(np.concatenate([obs, [reward, terminated, truncated]]))
        if terminated or truncated:
            obs, _ = env.reset()
            trace.append(obs)
    return trace


def same_trace(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(params=list(FAMILIES))
def name(request) -> str:
    return request.param


def sampled_tasks(name: str, n: int, seed: int = 0):
    env = make(name)
    env.reset(seed=seed)
    return env.unwrapped.sample_tasks(n)


# --- API checkers ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*Box observation space m:UserWarning")  # the parents' unbounded boxes
def test_gymnasium_check_env(name):
    from gymnasium.utils.env_checker import check_env

    env = make(name).unwrapped
    check_env(env, skip_render_check=True)
    env.set_task(sampled_tasks(name, 1)[0])
    check_env(env, skip_render_check=True)


def test_sb3_check_env(name):
    from stable_baselines3.common.env_checker import check_env

    env = make(name)
    env.unwrapped.set_task(sampled_tasks(name, 1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complaints either
        check_env(env, warn=True)


# --- the task spec -----------------------------------------------------------------------


def test_spec_is_sized_from_the_model(name):
    cls, _, sizes = FAMILIES[name]
    env = cls()
    spec = env.task_spec
    assert spec.names() == list(PARAMETERS)
    assert tuple(f.size for f in spec.fields) == sizes
    assert all((f.low, f.high) == (-3.0, 3.0) for f in spec.fields)
    assert {k: len(v) for k, v in env.task_entry_names.items()} == dict(zip(PARAMETERS, sizes))
    # the skipped entries are exactly the zero ones: the world body and the undamped root dofs
    nominal = env.nominal_parameters()
    for field in PARAMETERS:
        assert np.count_nonzero(nominal[field]) == spec.fields[PARAMETERS.index(field)].size
    assert "world" not in env.task_entry_names["body_mass"]
    assert env.get_task() == env.nominal_task() == {f: [0.0] * s for f, s in zip(PARAMETERS, sizes)}
    json.dumps(env.get_task())


def test_sampled_tasks_are_in_range_and_from_np_random(name):
    env = make(name, log_scale_range=(-0.5, 2.0)).unwrapped
    env.reset(seed=7)
    np.random.seed(0)
    tasks = env.sample_tasks(3)
    env.reset(seed=7)
    np.random.seed(1)  # the global generator plays no part
    assert env.sample_tasks(3) == tasks
    for task in tasks:
        for field in PARAMETERS:
            values = np.asarray(task[field])
            assert values.shape == (env.task_spec.fields[PARAMETERS.index(field)].size,)
            assert values.min() >= -0.5 and values.max() <= 2.0
    assert tasks[0] != tasks[1]


# --- determinism and dynamics ------------------------------------------------------------


def test_same_seed_same_tasks_and_rollouts(name):
    a, b = make(name), make(name)
    a.reset(seed=3)
    b.reset(seed=3)
    tasks_a, tasks_b = a.unwrapped.sample_tasks(2), b.unwrapped.sample_tasks(2)
    assert tasks_a == tasks_b
    a.unwrapped.set_task(tasks_a[1])
    b.unwrapped.set_task(tasks_b[1])
    assert same_trace(rollout(a, seed=5), rollout(b, seed=5))


def test_different_tasks_give_different_dynamics(name):
    task_a, task_b = sampled_tasks(name, 2)
    a, b, nominal = make(name), make(name), make(name)
    a.unwrapped.set_task(task_a)
    b.unwrapped.set_task(task_b)
    trace_a, trace_b, trace_nominal = (
        rollout(a, seed=5, steps=10),
        rollout(b, seed=5, steps=10),
        rollout(nominal, seed=5, steps=10),
    )
    assert np.array_equal(trace_a[0], trace_b[0])  # same reset state ...
    assert not np.allclose(trace_a[1], trace_b[1])  # ... different dynamics from the first step
    assert not np.allclose(trace_a[1], trace_nominal[1])


def test_nominal_task_is_exactly_the_parent_env(name):
    _, parent_id, _ = FAMILIES[name]
    parent = gym.make(parent_id)
    fresh = make(name)
    restored = make(name)
    restored.unwrapped.set_task(sampled_tasks(name, 1)[0])
    restored.unwrapped.set_task(restored.unwrapped.nominal_task())
    assert_same_model(fresh, parent)
    assert_same_model(restored, parent)
    expected = rollout(parent, seed=11, steps=150)
    assert same_trace(rollout(fresh, seed=11, steps=150), expected)
    assert same_trace(rollout(restored, seed=11, steps=150), expected)


def test_parent_kwargs_are_passed_on():
    env = make("HopperRandParams", reset_noise_scale=0.0, healthy_reward=3.0)
    obs, _ = env.reset(seed=0)
    unwrapped = env.unwrapped
    assert np.array_equal(obs, unwrapped._get_obs())
    assert np.array_equal(unwrapped.data.qpos, unwrapped.init_qpos)
    assert unwrapped._healthy_reward == 3.0


# --- the model ---------------------------------------------------------------------------


def test_model_is_restored_exactly(name):
    env = make(name).unwrapped
    nominal = env.nominal_parameters()
    env.set_task(sampled_tasks(name, 1)[0])
    assert not np.array_equal(env.model.body_mass, nominal["body_mass"])
    env.set_task(env.nominal_task())
    for field in PARAMETERS:
        assert np.array_equal(getattr(env.model, field), nominal[field]), field
    assert_same_model(env, make(name))  # derived constants too


def test_task_a_then_b_equals_b_on_a_fresh_env(name):
    task_a, task_b = sampled_tasks(name, 2)
    env, fresh = make(name), make(name)
    env.unwrapped.set_task(task_a)
    env.unwrapped.set_task(task_b)
    fresh.unwrapped.set_task(task_b)
    assert_same_model(env, fresh)
    assert same_trace(rollout(env, seed=2, steps=20), rollout(fresh, seed=2, steps=20))


def test_scaled_values_are_nominal_times_base_to_the_u(name):
    env = make(name).unwrapped
    nominal = env.nominal_parameters()
    task = sampled_tasks(name, 1)[0]
    env.set_task(task)
    for field in PARAMETERS:
        flat_nominal = nominal[field].ravel()
        included = np.flatnonzero(flat_nominal)
        expected = flat_nominal.copy()
        expected[included] = flat_nominal[included] * BASES[field] ** np.asarray(task[field])
        assert np.array_equal(getattr(env.model, field).ravel(), expected), field
        assert getattr(env.model, field).shape == nominal[field].shape
    # the derived constants follow the new masses (mj_setConst)
    assert env.model.body_subtreemass[0] == pytest.approx(env.model.body_mass.sum(), rel=1e-12)
    # the geom and body order of the task lists
    assert env.task_entry_names["body_mass"][0] == "torso"
    assert env.task_entry_names["body_inertia"][:3] == ["torso/0", "torso/1", "torso/2"]
    assert env.task_entry_names["geom_friction"][:3] == ["floor/slide", "floor/spin", "floor/roll"]


def test_set_task_mid_episode_keeps_the_state():
    env = make("HalfCheetahRandParams")
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    data = env.unwrapped.data
    qpos, qvel, time = data.qpos.copy(), data.qvel.copy(), data.time
    env.unwrapped.set_task(sampled_tasks("HalfCheetahRandParams", 1)[0])
    assert np.array_equal(data.qpos, qpos) and np.array_equal(data.qvel, qvel) and data.time == time


def test_task_persists_across_resets():
    env = make("Walker2dRandParams")
    task = sampled_tasks("Walker2dRandParams", 1)[0]
    env.unwrapped.set_task(task)
    masses = env.unwrapped.model.body_mass.copy()
    env.reset(seed=1)
    assert env.unwrapped.get_task() == task
    assert np.array_equal(env.unwrapped.model.body_mass, masses)


# --- bad tasks ---------------------------------------------------------------------------


def _bad(task, field, value):
    bad = dict(task)
    bad[field] = value
    return bad


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (
            lambda t: _bad(t, "body_mass", t["body_mass"][:-1]),
            InvalidTask,
            ["'body_mass'", "a list of 7 numbers", "[-3.0, 3.0]"],
        ),
        (
            lambda t: _bad(t, "dof_damping", t["dof_damping"] + [0.0]),
            InvalidTask,
            ["'dof_damping'", "a list of 6 numbers", "[-3.0, 3.0]"],
        ),
        (
            lambda t: {k: v for k, v in t.items() if k != "geom_friction"},
            InvalidTask,
            ["missing", "'geom_friction'", "a list of 27 numbers in [-3.0, 3.0]"],
        ),
        (
            lambda t: _bad(t, "body_inertia", ["big"] * 21),
            InvalidTask,
            ["'body_inertia'", "a list of 21 numbers", "[-3.0, 3.0]"],
        ),
        (lambda t: _bad(t, "body_mass", "0.5"), InvalidTask, ["'body_mass'", "a list of 7 numbers"]),
        (lambda t: _bad(t, "body_mass", [True] * 7), InvalidTask, ["'body_mass'", "a list of 7 numbers"]),
        (lambda t: _bad(t, "body_mass", [float("nan")] * 7), InvalidTask, ["'body_mass'", "finite"]),
        (
            lambda t: _bad(t, "body_inertia", [[0.0, 0.0, 0.0]] * 7),
            InvalidTask,
            ["'body_inertia'", "a list of 21 numbers"],
        ),
        (
            lambda t: _bad(t, "geom_friction", [0.0] * 26 + [3.5]),
            TaskOutOfRange,
            ["'geom_friction'", "outside the range", "[-3.0, 3.0]"],
        ),
        (lambda t: {**t, "gravity": 1.0}, InvalidTask, ["unknown", "'gravity'"]),
        (lambda t: [0.0] * 61, InvalidTask, ["must be a dict"]),
    ],
)
def test_bad_tasks_raise_clear_errors(mutate, error, fragments):
    env = make("HalfCheetahRandParams").unwrapped
    good = env.sample_tasks(1)[0]
    env.set_task(good)
    before = model_arrays(env)
    with pytest.raises(error) as caught:
        env.set_task(mutate(good))
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert env.get_task() == good  # a rejected task changes nothing
    after = model_arrays(env)
    assert all(np.array_equal(v, after[k], equal_nan=True) for k, v in before.items())


def test_out_of_range_allowed_with_a_warning():
    env = make("HopperRandParams").unwrapped
    task = env.nominal_task()
    task["body_mass"] = [4.0, 0.0, 0.0, 0.0]
    with pytest.warns(UserWarning, match="'body_mass'.*outside the range"):
        env.set_task(task, allow_out_of_range=True)
    assert env.model.body_mass[1] == env.nominal_parameters()["body_mass"][1] * 1.5**4.0


def test_constructor_arguments():
    task = sampled_tasks("HopperRandParams", 1)[0]
    env = make("HopperRandParams", task=task)
    assert env.unwrapped.get_task() == task
    with pytest.raises(InvalidTask, match="'dof_damping'"):
        HopperRandParamsEnv(task={**task, "dof_damping": [0.0]})
    with pytest.raises(TypeError):
        HopperRandParamsEnv((-1.0, 1.0))  # keyword-only
    for bad_range in [(1.0, -1.0), (0.0, float("inf")), (0.0,), "ab", (True, 2)]:
        with pytest.raises(ValueError, match="log_scale_range"):
            HopperRandParamsEnv(log_scale_range=bad_range)
    # a range without 0 keeps the nominal default quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = HopperRandParamsEnv(log_scale_range=(0.5, 1.0))
    assert env.get_task() == env.nominal_task()
    assert all((f.low, f.high) == (0.5, 1.0) for f in env.task_spec.fields)


# --- serialisation -----------------------------------------------------------------------


def test_json_round_trip(name):
    task = sampled_tasks(name, 1)[0]
    env, other = make(name), make(name)
    env.unwrapped.set_task(task)
    text = json.dumps(env.unwrapped.get_task())
    other.unwrapped.set_task(json.loads(text))
    assert other.unwrapped.get_task() == task
    assert_same_model(env, other)


def test_pickle_and_deepcopy_keep_the_task(name):
    env = make(name, reset_noise_scale=0.05).unwrapped
    env.set_task(sampled_tasks(name, 1)[0])
    for clone in (copy.deepcopy(env), pickle.loads(pickle.dumps(env))):
        assert clone.get_task() == env.get_task()
        assert clone._reset_noise_scale == 0.05
        assert_same_model(clone, env)


def test_registration_ids():
    assert set(RAND_PARAMS_ENVS) == set(FAMILIES)
    for registered in RAND_PARAMS_ENVS:
        env = make(registered)
        assert isinstance(env.unwrapped, FAMILIES[registered][0])
        assert env.spec.max_episode_steps == 200
