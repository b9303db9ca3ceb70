"""Meta-World ML1/ML10/ML45 behind the task interface (envs.metaworld_tasks).

Building a Meta-World env class costs ~0.2 s of CPU, so the envs are module fixtures: ML1
reach-v3 train (twice: through gymnasium.make and directly), ML1 reach-v3 test and the ML10
test split (5 classes). ML45 (45 + 5 classes, ~10 s of CPU to build) is only checked by its
env-name listing, which builds nothing.
"""

from __future__ import annotations

import json
import pickle
import socket
import warnings

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("metaworld")

from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from envs.base import InvalidTask
from envs.metaworld_tasks import (
    METAWORLD_ENVS,
    N_GOALS,
    MetaWorldEnv,
    benchmark_env_names,
    ml1_env_names,
)

NAMESPACE = "metarl-test-metaworld"
ML10_TRAIN = [
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "sweep-v3",
    "basketball-v3",
]
ML10_TEST = ["drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"]
ML45_TEST = ["bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"]

CONNECTIONS: list = []  # network connections attempted while building envs (must stay empty)


@pytest.fixture(scope="module", autouse=True)
def no_network():
    def refuse(*args, **kwargs):
        CONNECTIONS.append(args)
        raise OSError("network access refused by test_envs_metaworld")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield
    assert CONNECTIONS == []


@pytest.fixture(scope="module")
def ml1():
    for name, (entry_point, vector_entry_point, horizon) in METAWORLD_ENVS.items():
        if f"{NAMESPACE}/{name}-v0" not in gym.registry:
            gym.register(
                id=f"{NAMESPACE}/{name}-v0",
                entry_point=entry_point,
                vector_entry_point=vector_entry_point,
                max_episode_steps=horizon,
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the passive checker on the hidden goal's zero-width bounds
        env = gym.make(f"{NAMESPACE}/MetaWorld-ML1-v0", task_name="reach-v3", seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def ml1_direct():
    env = MetaWorldEnv(benchmark="ML1", task_name="reach-v3", split="train", seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def ml1_test():
    env = MetaWorldEnv(benchmark="ML1", task_name="reach-v3", split="test", seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def ml10_test():
    env = MetaWorldEnv(benchmark="ML10", split="test", seed=0)
    yield env
    env.close()


def goals(env: MetaWorldEnv) -> dict[str, list[np.ndarray]]:
    return {name: [pickle.loads(t.data)["rand_vec"] for t in tasks] for name, tasks in env._mw_tasks.items()}


def rollout(env, task, n_steps=15, seed=0):
    env.set_task(task)
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(n_steps, 4)).astype(np.float32)
    out = [obs]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        out += [obs, reward]
    return out


def test_check_env_gymnasium_and_sb3_ml1(ml1):
    assert ml1.spec.max_episode_steps == 500
    env = ml1.unwrapped
    assert env.observation_space.shape == (39,) and env.action_space.shape == (4,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite object bounds, zero-width hidden-goal bounds: Meta-World's
        check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)
    assert env.render_mode is None and env.metaworld_env.render_mode is None  # rendering off by default
    assert env.render() is None


def test_check_env_ml10_and_env_swap(ml10_test):
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ml10_test
    instances = {}
    for name in ML10_TEST:
        env.set_task({"env_name": name, "index": 3})
        instances[name] = env.metaworld_env
        assert type(env.metaworld_env) is ALL_V3_ENVIRONMENTS[name]
        for attr in ("observation_space", "action_space"):  # the same spaces for every env class
            inner, outer = getattr(env.metaworld_env, attr), getattr(env, attr)
            assert inner.shape == outer.shape and inner.dtype == outer.dtype
            assert np.array_equal(inner.low, outer.low) and np.array_equal(inner.high, outer.high)
    assert len({id(e) for e in instances.values()}) == 5  # one instance per env class
    env.set_task({"env_name": "door-close-v3", "index": 0})
    assert env.metaworld_env is instances["door-close-v3"]  # taken back from the idle pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)
    assert env.get_task() == {"env_name": "door-close-v3", "index": 0}


def test_an_env_holds_one_class_and_the_process_reuses_idle_ones(ml10_test, monkeypatch):
    from envs import metaworld_pool

    env = ml10_test
    rollout(env, {"env_name": "drawer-open-v3", "index": 3}, seed=1)  # give the instance a history
    drawer = env.metaworld_env
    env.set_task({"env_name": "lever-pull-v3", "index": 0})
    assert list(env._envs) == ["lever-pull-v3"]  # the drawer-open env went back to the idle pool
    reused = MetaWorldEnv(benchmark="ML10", split="test", seed=0)  # its first class: drawer-open-v3
    assert reused.metaworld_env is drawer
    with monkeypatch.context() as mp:
        mp.setattr(metaworld_pool, "IDLE", {})
        fresh = MetaWorldEnv(benchmark="ML10", split="test", seed=0)
    fresh_drawer = fresh.metaworld_env
    assert fresh_drawer is not drawer
    task = {"env_name": "drawer-open-v3", "index": 7}
    for x, y in zip(rollout(reused, task, seed=2), rollout(fresh, task, seed=2)):
        assert np.array_equal(x, y)  # how an instance was used before does not change its episodes

    monkeypatch.setattr(metaworld_pool, "IDLE_PER_CLASS", 1)
    monkeypatch.setattr(metaworld_pool, "IDLE", {})
    for e in (reused, fresh):
        e.set_task({"env_name": "lever-pull-v3", "index": 0})
    (idle,) = metaworld_pool.IDLE.values()  # the drawer-open class: one kept, the second closed
    assert len(idle) == 1 and idle[0] is drawer and fresh_drawer not in idle


def test_same_seed_same_tasks_and_rollouts(ml1, ml1_direct):
    a, b = ml1.unwrapped, ml1_direct
    for name in goals(a):  # same benchmark seed: the same task set
        assert all(np.array_equal(x, y) for x, y in zip(goals(a)[name], goals(b)[name]))
    a.reset(seed=5)
    b.reset(seed=5)
    tasks_a, tasks_b = a.sample_tasks(6), b.sample_tasks(6)
    a.reset(seed=6)
    assert tasks_a == tasks_b and tasks_a != a.sample_tasks(6)
    assert json.loads(json.dumps(tasks_a)) == tasks_a
    assert all(t["env_name"] == "reach-v3" and 0 <= t["index"] < N_GOALS for t in tasks_a)
    ra, rb = rollout(a, tasks_a[0]), rollout(b, tasks_a[0])
    assert all(np.array_equal(x, y) for x, y in zip(ra, rb))


def test_sample_tasks_is_uniform_over_the_split(ml10_test):
    ml10_test.reset(seed=0)
    tasks = ml10_test.sample_tasks(500)
    counts = {name: sum(t["env_name"] == name for t in tasks) for name in ML10_TEST}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    assert len({t["index"] for t in tasks}) > 40
    assert ml10_test.num_tasks == 5 * N_GOALS


def test_different_tasks_give_different_rewards(ml1):
    env = ml1.unwrapped
    r0 = rollout(env, {"env_name": "reach-v3", "index": 0})
    goal0 = env.metaworld_env._target_pos.copy()
    r1 = rollout(env, {"env_name": "reach-v3", "index": 1})
    assert not np.allclose(goal0, env.metaworld_env._target_pos)
    assert not np.allclose(r0[2::2], r1[2::2])  # same actions, different rewards


def test_goal_fixed_across_resets(ml1):
    env = ml1.unwrapped
    env.set_task({"env_name": "reach-v3", "index": 7})
    with pytest.raises(gym.error.ResetNeeded):  # set_task needs a reset before stepping
        env.step(np.zeros(4, dtype=np.float32))
    first_obs, first_goal = None, None
    for seed in (None, 1, None):
        obs, info = env.reset(seed=seed)
        goal = env.metaworld_env._target_pos.copy()
        if first_goal is None:
            first_obs, first_goal = obs, goal
        assert np.array_equal(goal, first_goal) and np.array_equal(obs, first_obs)
        assert np.all(obs[-3:] == 0)  # ML: the goal is hidden from the observation
        for _ in range(3):
            env.step(env.action_space.sample())
    assert env.metaworld_env._freeze_rand_vec and env.get_task() == {"env_name": "reach-v3", "index": 7}


def test_info_success_and_truncation_at_500_without_errors(ml1):
    env = ml1.unwrapped
    env.set_task({"env_name": "reach-v3", "index": 2})
    env.reset(seed=0)
    action = np.zeros(4, dtype=np.float32)
    for t in range(1, 506):  # Meta-World itself raises on step 501
        obs, reward, terminated, truncated, info = env.step(action)
        assert truncated == (t >= 500) and not terminated
        if t == 1:
            assert "success" in info and isinstance(info["success"], (bool, float)) and "near_object" in info
    assert np.isfinite(obs).all() and np.isfinite(reward)


def test_matches_metaworld_benchmark(ml1, ml1_test, monkeypatch):
    import metaworld

    monkeypatch.setattr(metaworld, "_N_GOALS", 3)  # the first 3 goals of metaworld.ML1("reach-v3", seed=0)
    bench = metaworld.ML1("reach-v3", seed=0)
    for env, theirs in ((ml1.unwrapped, bench.train_tasks), (ml1_test, bench.test_tasks)):
        for mine, their in zip(env._mw_tasks["reach-v3"], theirs):
            a, b = pickle.loads(mine.data), pickle.loads(their.data)
            assert a.keys() == b.keys() and a["env_cls"] is b["env_cls"] and a["partially_observable"]
            assert np.array_equal(a["rand_vec"], b["rand_vec"])


def test_train_and_test_task_sets_are_disjoint(ml1, ml1_test, ml10_test):
    train, test = goals(ml1.unwrapped)["reach-v3"], goals(ml1_test)["reach-v3"]
    assert len(train) == len(test) == N_GOALS
    assert not any(np.allclose(x, y) for x in train for y in test)  # ML1: same env, other goals
    assert benchmark_env_names("ML10", "train") == ML10_TRAIN
    assert benchmark_env_names("ML10", "test") == ML10_TEST == ml10_test.env_names
    ml10_test.reset(seed=0)
    assert {t["env_name"] for t in ml10_test.sample_tasks(100)} <= set(ML10_TEST)
    with pytest.raises(InvalidTask, match="env_name.*drawer-open-v3"):
        ml10_test.set_task({"env_name": "reach-v3", "index": 0})  # a train env in the test split


def test_ml45_names_without_building():
    train, test = benchmark_env_names("ML45", "train"), benchmark_env_names("ML45", "test")
    assert len(train) == 45 and test == ML45_TEST and not set(train) & set(test)
    assert sorted(train + test) == sorted(ml1_env_names()) and len(ml1_env_names()) == 50
    assert benchmark_env_names("ML1", "test", "reach-v3") == ["reach-v3"]


@pytest.mark.parametrize(
    "task, match",
    [
        ({"env_name": "reach-v2", "index": 0}, r"'env_name' must be one of \['reach-v3'\], got 'reach-v2'"),
        ({"env_name": "reach-v3", "index": 50}, r"'index' must be an int in \[0, 49\], got 50"),
        ({"env_name": "reach-v3", "index": -1}, r"'index' must be an int in \[0, 49\]"),
        ({"env_name": "reach-v3", "index": 1.0}, r"'index' must be an int"),
        ({"env_name": "reach-v3", "index": True}, r"'index' must be an int"),
        ({"env_name": "reach-v3"}, r"missing field\(s\) \['index'\]"),
        ({"index": 3}, r"missing field\(s\) \['env_name'\]"),
        ({"env_name": "reach-v3", "index": 0, "goal": [0, 0, 0]}, r"unknown task field\(s\) \['goal'\]"),
        ("reach-v3", "must be a dict"),
    ],
)
def test_bad_tasks_raise_clear_errors(ml1, task, match):
    env = ml1.unwrapped
    env.set_task({"env_name": "reach-v3", "index": 4})
    with pytest.raises(InvalidTask, match=match):
        env.set_task(task)
    with pytest.raises(InvalidTask, match=match):
        env.set_task(task, allow_out_of_range=True)
    assert env.get_task() == {"env_name": "reach-v3", "index": 4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(benchmark="ML1", task_name="reach-v2"),
            r"unknown Meta-World task_name 'reach-v2'.*ml1_env_names.*'reach-v3'",
        ),
        (dict(benchmark="ML1"), "needs task_name"),
        (dict(benchmark="ML10", task_name="reach-v3"), "only for benchmark 'ML1'"),
        (dict(benchmark="ML3"), r"benchmark must be one of \['ML1', 'ML10', 'ML45'\]"),
        (dict(benchmark="ML10", split="val"), r"split must be one of \['train', 'test'\]"),
        (dict(benchmark="ML10", seed=-1), "seed must be an int"),
        (dict(benchmark="ML10", seed=None), "seed must be an int"),
        (dict(benchmark="ML10", max_path_length=0), "max_path_length"),
        (dict(benchmark="ML10", render_mode="video"), "render_mode"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):  # all rejected before building anything
    with pytest.raises(ValueError, match=match):
        MetaWorldEnv(**kwargs)
