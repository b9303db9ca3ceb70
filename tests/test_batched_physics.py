"""The batched locomotion path (envs.batched.PhysicsBatch) against the gymnasium envs themselves.

Reference: the family's own ``env.step`` on an identical set of envs (same tasks, same reset seeds,
same actions). Episodes run to termination or a horizon, terminated envs are reset with fresh
seeds and some get a new task mid-run, so resets and task changes are covered. The physics is the
same ``mj_step`` on the env's own data, so observations are compared bit for bit; reward and info
terms are NumPy reductions over the same numbers (compared to 1e-12).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from envs.batched import PhysicsBatch, batched_kind

FAMILIES = [
    "HalfCheetahVel",
    "HalfCheetahDir",
    "AntVel",
    "AntDir",
    "AntDir2D",
    "AntGoal",
    "HalfCheetahRandParams",
    "HopperRandParams",
    "Walker2dRandParams",
]
N = 4


def _make(name: str, n: int, **kwargs):
    return [gym.make(f"metarl/{name}-v0", disable_env_checker=True, **kwargs).unwrapped for _ in range(n)]


def _run_both(name: str, steps: int, *, threads: int = 1, float32_actions: bool = True, **kwargs):
    rng = np.random.default_rng(7)
    reference = _make(name, N, **kwargs)
    batch = PhysicsBatch(_make(name, N, **kwargs), threads=threads)
    tasks = reference[0].sample_tasks(N)
    for env, task in zip(reference, tasks):
        env.set_task(task)
    batch.set_tasks(tasks)
    seeds = [11, 12, 13, 14]
    ref_obs = np.stack([env.reset(seed=s)[0] for env, s in zip(reference, seeds)])
    np.testing.assert_array_equal(batch.reset(seeds), ref_obs)
    low, high = reference[0].action_space.low, reference[0].action_space.high
    terminations = 0
    for t in range(steps):
        actions = rng.uniform(low, high, size=(N, low.size))
        if float32_actions:  # what the sampler passes
            actions = actions.astype(np.float32)
        obs, reward, terminated, info = batch.step(actions)
        for i, env in enumerate(reference):
            o, r, te, tr, inf = env.step(actions[i])
            np.testing.assert_array_equal(obs[i], o, err_msg=f"{name} obs, env {i}, step {t}")
            assert reward[i] == pytest.approx(r, rel=1e-12, abs=1e-12), (name, i, t)
            assert bool(terminated[i]) == te and not tr
            assert set(info) == set(inf), (name, sorted(info), sorted(inf))
            for key, value in inf.items():
                assert info[key][i] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, key, i, t)
            if te or t % 60 == 59:  # a fresh episode; every other one on a new task
                seed = 100 + 10 * t + i
                if t % 120 == 59:
                    new_task = reference[0].sample_tasks(1)[0]
                    env.set_task(new_task)
                    batch.envs[i].set_task(new_task)
                    batch.refresh_tasks()
                terminations += te
                env.reset(seed=seed)
                batch.envs[i].reset(seed=seed)
    return terminations


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_step_equals_the_gymnasium_env(name):
    _run_both(name, 130)


def test_batched_step_covers_terminations():
    # Hopper falls within tens of steps under random actions: the terminated flag and the resets
    # after it are compared, not only running episodes.
    assert _run_both("HopperRandParams", 130) > 0


def test_batched_step_with_threads_and_constructor_arguments():
    # Two physics threads, float64 actions, and non-default constructor arguments read from the env.
    _run_both("AntGoal", 70, threads=2, float32_actions=False, terminate_when_unhealthy=True, ctrl_cost_weight=0.1)
    _run_both("HalfCheetahVel", 70, threads=3, exclude_current_positions_from_observation=False)


def test_batched_kind_and_bad_input():
    assert [batched_kind(_make(n, 1)[0]) for n in ("HalfCheetahVel", "AntDir", "HopperRandParams")] == [
        "cheetah",
        "ant",
        "hopper",
    ]
    nav = gym.make("metarl/Navigation2D-v0").unwrapped
    assert batched_kind(nav) is None
    with pytest.raises(ValueError, match="one batchable class"):
        PhysicsBatch(_make("HalfCheetahVel", 1) + _make("HalfCheetahDir", 1))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        PhysicsBatch(_make("HalfCheetahVel", 1), threads=0)
