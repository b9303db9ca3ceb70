"""Navigation2D, its native vector env, the task interface and registration."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers metarl/*)
from envs.base import InvalidTask, TaskOutOfRange
from envs.navigation import Navigation2DEnv, Navigation2DVectorEnv
from envs.vector import SyncTaskVectorEnv, make_task_vector_env

ID = "metarl/Navigation2D-v0"


def test_check_env_gymnasium_and_sb3():
    env = gym.make(ID)
    assert env.spec.max_episode_steps == 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite observation bounds, non-[-1, 1] actions: by design
        check_env(env.unwrapped)
        sb3_check_env(gym.make(ID), warn=True)


def test_same_seed_same_tasks_and_rollouts():
    def rollout(seed):
        env = gym.make(ID)
        env.reset(seed=seed)
        tasks = env.unwrapped.sample_tasks(5)
        env.unwrapped.set_task(tasks[2])
        obs, _ = env.reset(seed=seed)
        out = [obs]
        rng = np.random.default_rng(7)
        for _ in range(20):
            obs, reward, *_ = env.step(rng.uniform(-0.1, 0.1, 2).astype(np.float32))
            out += [obs, reward]
        return tasks, out

    t1, r1 = rollout(3)
    t2, r2 = rollout(3)
    t3, _ = rollout(4)
    assert t1 == t2 and t1 != t3
    assert all(np.array_equal(a, b) for a, b in zip(r1, r2))
    assert all(-0.5 <= c <= 0.5 for t in t1 for c in t["goal"])
    json.dumps(t1)  # tasks are JSON-serialisable


def test_reward_is_minus_distance_and_depends_on_the_task():
    env = Navigation2DEnv(task={"goal": [0.3, -0.2]})
    other = Navigation2DEnv(task={"goal": [-0.4, 0.1]})
    env.reset(seed=0)
    other.reset(seed=0)
    for action in ([0.1, 0.0], [0.05, -0.1], [0.5, -0.5]):  # the last is clipped to [0.1, -0.1]
        obs, reward, terminated, truncated, info = env.step(np.array(action, dtype=np.float32))
        obs2, reward2, *_ = other.step(np.array(action, dtype=np.float32))
        assert np.array_equal(obs, obs2)  # same trajectory
        assert reward == pytest.approx(-np.hypot(obs[0] - 0.3, obs[1] + 0.2), abs=1e-6)
        assert reward != reward2
        assert not terminated and not truncated
    np.testing.assert_allclose(obs, [0.25, -0.2], atol=1e-6)


def test_terminates_at_the_goal_and_truncates_at_the_horizon():
    env = gym.make(ID)
    env.unwrapped.set_task({"goal": [0.1, 0.0]})
    env.reset(seed=0)
    *_, terminated, truncated, info = env.step(np.array([0.1, 0.0], dtype=np.float32))
    assert terminated and not truncated and info["distance"] < 0.01
    env = gym.make(ID, max_episode_steps=7)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2, dtype=np.float32))[3] for _ in range(7)]
    assert flags == [False] * 6 + [True]


def test_bad_tasks_name_the_field_and_range():
    env = Navigation2DEnv()
    with pytest.raises(
        InvalidTask, match=r"task field 'goal' must be a list of 2 numbers in \[-0.5, 0.5\], got \[0.1\]"
    ):
        env.set_task({"goal": [0.1]})
    with pytest.raises(InvalidTask, match=r"unknown task field\(s\) \['velocity'\]"):
        env.set_task({"goal": [0.1, 0.1], "velocity": 1})
    with pytest.raises(InvalidTask, match=r"task is missing field\(s\) \['goal'\]"):
        env.set_task({})
    with pytest.raises(InvalidTask, match="must be a list of 2 numbers"):
        env.set_task({"goal": ["a", 0.1]})
    with pytest.raises(InvalidTask, match="must be finite"):
        env.set_task({"goal": [float("nan"), 0.1]})
    with pytest.raises(TaskOutOfRange, match=r"outside the range of this family: a list of 2 numbers in \[-0.5, 0.5\]"):
        env.set_task({"goal": [0.9, 0.1]})
    assert env.get_task() == {"goal": [0.0, 0.0]}  # a refused task changes nothing
    with pytest.warns(UserWarning, match="outside the range"):
        env.set_task({"goal": [0.9, 0.1]}, allow_out_of_range=True)
    assert env.get_task() == {"goal": [0.9, 0.1]}
    task = env.get_task()
    task["goal"][0] = 0.0
    assert env.get_task() == {"goal": [0.9, 0.1]}  # get_task returns a copy


def test_native_vector_env_equals_sync_vector_env_step_for_step():
    n = 5
    native = make_task_vector_env(ID, n, max_episode_steps=30)
    assert isinstance(native, Navigation2DVectorEnv)
    sync = SyncTaskVectorEnv([lambda: gym.make(ID, max_episode_steps=30) for _ in range(n)])
    native.reset(seed=0)
    tasks = native.sample_tasks(n)
    tasks[0] = {"goal": [0.1, 0.0]}  # reached at the first step: exercises termination + autoreset
    native.set_tasks(tasks)
    sync.set_tasks(tasks)
    assert native.get_tasks() == sync.get_tasks() == tasks
    o1, _ = native.reset(seed=1)
    o2, _ = sync.reset(seed=1)
    assert np.array_equal(o1, o2)
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(75):
        actions = rng.uniform(-0.15, 0.15, size=(n, 2)).astype(np.float32)
        actions[0] = [0.1, 0.0] if t % 3 == 0 else [0.0, 0.0]
        a, b = native.step(actions), sync.step(actions)
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
        ends += int(a[2].sum() + a[3].sum())
    assert ends >= 5 + 25  # truncations at 30 and 60, and env 0 reaching its goal repeatedly


def test_vector_env_task_errors():
    env = Navigation2DVectorEnv(3)
    with pytest.raises(ValueError, match="needs 3 tasks"):
        env.set_tasks([{"goal": [0.0, 0.0]}])
    with pytest.raises(InvalidTask, match="'goal'"):
        env.set_tasks([{"goal": [0.0, 0.0]}, {"goal": [0.0]}, {"goal": [0.0, 0.0]}])
