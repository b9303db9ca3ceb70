"""Tests for the goal/direction locomotion families (envs/locomotion.py)."""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from contextlib import contextmanager

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from envs.base import InvalidTask, MetaEnv, TaskOutOfRange
from envs.locomotion import HALF_CHEETAH_CTRL_COST_WEIGHT, LOCOMOTION_ENVS

FAMILIES = list(LOCOMOTION_ENVS)
N_STEPS = 15

# The plain gymnasium env each family must reproduce observation for observation.
PARENTS = {
    "HalfCheetahVel": ("HalfCheetah-v5", {"ctrl_cost_weight": HALF_CHEETAH_CTRL_COST_WEIGHT}),
    "HalfCheetahDir": ("HalfCheetah-v5", {"ctrl_cost_weight": HALF_CHEETAH_CTRL_COST_WEIGHT}),
    "AntVel": ("Ant-v5", {}),
    "AntDir": ("Ant-v5", {}),
    "AntDir2D": ("Ant-v5", {}),
    "AntGoal": ("Ant-v5", {"exclude_current_positions_from_observation": False, "terminate_when_unhealthy": False}),
}

# Two distinct valid tasks per family.
TWO_TASKS = {
    "HalfCheetahVel": ({"velocity": 0.3}, {"velocity": 1.7}),
    "HalfCheetahDir": ({"direction": 1}, {"direction": -1}),
    "AntVel": ({"velocity": 0.5}, {"velocity": 2.5}),
    "AntDir": ({"direction": 1}, {"direction": -1}),
    "AntDir2D": ({"direction": [0.6, 0.8]}, {"direction": [-0.8, 0.6]}),
    "AntGoal": ({"goal": [2.0, -1.0]}, {"goal": [-2.5, 2.5]}),
}

DEFAULT_TASKS = {
    "HalfCheetahVel": {"velocity": 1.0},
    "HalfCheetahDir": {"direction": 1},
    "AntVel": {"velocity": 1.5},
    "AntDir": {"direction": 1},
    "AntDir2D": {"direction": [1.0, 0.0]},
    "AntGoal": {"goal": [0.0, 0.0]},
}


def expected_reward(family: str, task: dict, info: dict) -> float:
    """The documented reward formula, recomputed from ``info``."""
    if family == "HalfCheetahVel":
        return -abs(info["x_velocity"] - task["velocity"]) + info["reward_ctrl"]
    if family == "HalfCheetahDir":
        return task["direction"] * info["x_velocity"] + info["reward_ctrl"]
    if family == "AntVel":
        term = -abs(info["x_velocity"] - task["velocity"])
    elif family == "AntDir":
        term = task["direction"] * info["x_velocity"]
    elif family == "AntDir2D":
        term = task["direction"][0] * info["x_velocity"] + task["direction"][1] * info["y_velocity"]
    else:
        gx, gy = task["goal"]
        term = -(abs(info["x_position"] - gx) + abs(info["y_position"] - gy))
    return term + info["reward_survive"] + info["reward_ctrl"] + info["reward_contact"]


@contextmanager
def make(family: str, **kwargs):
    """``gymnasium.make`` of a family registered under a test namespace, or of a plain env id."""
    if family in LOCOMOTION_ENVS:
        env_id = f"metarl_test/{family}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=LOCOMOTION_ENVS[family], max_episode_steps=200)
    else:
        env_id = family
    env = gymnasium.make(env_id, **kwargs)
    try:
        yield env
    finally:
        env.close()


def actions_for(env, n: int = N_STEPS, seed: int = 0) -> np.ndarray:
    space = env.action_space
    return np.random.default_rng(seed).uniform(space.low, space.high, size=(n, *space.shape)).astype(np.float32)


def rollout(env, actions, seed: int):
    obs, _ = env.reset(seed=seed)
    observations, rewards, terminations, infos = [obs], [], [], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        terminations.append(terminated)
        infos.append(info)
        if terminated or truncated:
            break
    return np.array(observations), np.array(rewards), terminations, infos


# ----------------------------------------------------------------------------- API, checkers


def test_registry_table_points_at_metaenv_classes():
    assert FAMILIES == ["HalfCheetahVel", "HalfCheetahDir", "AntVel", "AntDir", "AntDir2D", "AntGoal"]
    for family in FAMILIES:
        with make(family) as env:
            assert isinstance(env.unwrapped, MetaEnv)
            assert type(env.unwrapped).__name__ == f"{family}Env"
            assert env.spec.max_episode_steps == 200
            assert env.unwrapped.get_task() == DEFAULT_TASKS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_gymnasium_and_sb3_env_checkers_pass(family):
    sb3_env_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    with make(family) as env:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the gymnasium checker reports problems as warnings
            gym_check_env(env.unwrapped, skip_render_check=True)
        # Only the unbounded observation Box, which every gymnasium MuJoCo env has, may be reported.
        problems = [str(w.message) for w in caught if "infinity" not in str(w.message)]
        assert not problems
        sb3_env_checker.check_env(env, warn=False)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_tasks_and_rollouts(family):
    with make(family) as a, make(family) as b:
        a.reset(seed=7)
        b.reset(seed=7)
        tasks_a, tasks_b = a.unwrapped.sample_tasks(4), b.unwrapped.sample_tasks(4)
        assert tasks_a == tasks_b
        assert len({repr(t) for t in tasks_a}) > 1 or family.endswith("Dir")
        a.unwrapped.set_task(tasks_a[0])
        b.unwrapped.set_task(tasks_b[0])
        actions = actions_for(a)
        obs_a, rew_a, _, _ = rollout(a, actions, seed=11)
        obs_b, rew_b, _, _ = rollout(b, actions, seed=11)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
        a.reset(seed=8)
        assert a.unwrapped.sample_tasks(4) != tasks_a or family.endswith("Dir")


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("family", FAMILIES)
def test_task_changes_reward_only_and_reward_matches_formula(family):
    task_1, task_2 = TWO_TASKS[family]
    with make(family) as env:
        actions = actions_for(env)
        env.unwrapped.set_task(task_1)
        obs_1, rew_1, term_1, infos_1 = rollout(env, actions, seed=3)
        env.unwrapped.set_task(task_2)
        obs_2, rew_2, term_2, infos_2 = rollout(env, actions, seed=3)
    np.testing.assert_array_equal(obs_1, obs_2)
    assert term_1 == term_2
    assert np.all(rew_1 != rew_2)
    for task, rewards, infos in ((task_1, rew_1, infos_1), (task_2, rew_2, infos_2)):
        recomputed = [expected_reward(family, task, info) for info in infos]
        np.testing.assert_allclose(rewards, recomputed, rtol=0, atol=1e-12)
        for reward, info in zip(rewards, infos):
            assert "reward_forward" not in info
            terms = [v for k, v in info.items() if k.startswith("reward_")]
            assert reward == pytest.approx(sum(terms), abs=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_physics_and_observations_equal_the_gymnasium_parent(family):
    parent_id, parent_kwargs = PARENTS[family]
    with make(family) as env, make(parent_id, **parent_kwargs) as parent:
        assert env.observation_space == parent.observation_space
        assert env.action_space == parent.action_space
        actions = actions_for(env)
        obs, rew, term, infos = rollout(env, actions, seed=5)
        parent_obs, parent_rew, parent_term, parent_infos = rollout(parent, actions, seed=5)
    np.testing.assert_array_equal(obs, parent_obs)
    assert term == parent_term
    for info, parent_info in zip(infos, parent_infos):
        for key in parent_info:
            if key != "reward_forward":
                assert info[key] == parent_info[key], key
    if family in ("HalfCheetahDir", "AntDir", "AntDir2D"):  # the default task is the parent's "run along +x"
        np.testing.assert_allclose(rew, parent_rew, rtol=0, atol=1e-12)


def test_half_cheetah_uses_maml_control_cost_and_can_override_it():
    with make("HalfCheetahVel") as env:
        assert env.unwrapped._ctrl_cost_weight == 0.05
        env.reset(seed=0)
        action = np.full(env.action_space.shape, 0.5, dtype=np.float32)
        _, _, _, _, info = env.step(action)
        assert info["reward_ctrl"] == pytest.approx(-0.05 * 6 * 0.25)
    with make("HalfCheetahDir", ctrl_cost_weight=0.1) as env:
        assert env.unwrapped._ctrl_cost_weight == 0.1
    with pytest.raises(TypeError, match="forward_reward_weight"), make("HalfCheetahVel", forward_reward_weight=2.0):
        pass


def test_ant_keeps_parent_termination():
    with make("AntVel") as env:
        env.reset(seed=0)
        ant = env.unwrapped
        qpos = ant.init_qpos.copy()
        qpos[2] = 1.5  # torso above the healthy z range (0.2, 1.0)
        ant.set_state(qpos, ant.init_qvel.copy())
        _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        assert terminated
        assert info["reward_survive"] == 0
        assert reward == pytest.approx(info["reward_velocity"] + info["reward_ctrl"] + info["reward_contact"])


def test_ant_goal_does_not_terminate_by_default():
    def unhealthy_step(env):
        env.reset(seed=0)
        ant = env.unwrapped
        qpos = ant.init_qpos.copy()
        qpos[2] = 1.5  # torso above the healthy z range (0.2, 1.0)
        ant.set_state(qpos, ant.init_qvel.copy())
        return env.step(np.zeros(env.action_space.shape, dtype=np.float32))

    with make("AntGoal") as env:
        assert env.unwrapped._terminate_when_unhealthy is False
        _, reward, terminated, _, info = unhealthy_step(env)
        assert not terminated
        assert info["reward_survive"] == 0  # the healthy bonus is still paid only while healthy
        assert reward == pytest.approx(info["reward_goal"] + info["reward_ctrl"] + info["reward_contact"])
    with make("AntGoal", terminate_when_unhealthy=True) as env:
        assert unhealthy_step(env)[2]


def test_ant_goal_observes_its_position():
    with make("AntGoal") as env:
        obs, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs[:2], env.unwrapped.data.qpos[:2])
        assert env.observation_space.shape == (107,)
    with make("AntVel") as env:
        assert env.observation_space.shape == (105,)


# ----------------------------------------------------------------------------- tasks


def test_ant_dir2d_samples_unit_directions_at_all_angles():
    with make("AntDir2D") as env:
        env.reset(seed=0)
        tasks = env.unwrapped.sample_tasks(200)
    directions = np.array([t["direction"] for t in tasks])
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, rtol=0, atol=1e-12)
    angles = np.arctan2(directions[:, 1], directions[:, 0])
    assert np.histogram(angles, bins=4, range=(-math.pi, math.pi))[0].min() > 25  # every quadrant


def test_sampled_ranges():
    with make("HalfCheetahVel") as cheetah, make("AntVel") as ant, make("AntGoal") as goal, make("AntDir") as direc:
        for env in (cheetah, ant, goal, direc):
            env.reset(seed=1)
        v = np.array([t["velocity"] for t in cheetah.unwrapped.sample_tasks(200)])
        assert v.min() >= 0 and v.max() <= 2 and v.max() > 1.8 and v.min() < 0.2
        v = np.array([t["velocity"] for t in ant.unwrapped.sample_tasks(200)])
        assert v.min() >= 0 and v.max() <= 3 and v.max() > 2.7
        g = np.array([t["goal"] for t in goal.unwrapped.sample_tasks(200)])
        assert g.shape == (200, 2) and g.min() >= -3 and g.max() <= 3 and g.min() < -2.7 and g.max() > 2.7
        assert {t["direction"] for t in direc.unwrapped.sample_tasks(50)} == {-1, 1}


def test_get_task_returns_a_copy():
    with make("AntDir2D") as env:
        ant = env.unwrapped
        ant.set_task({"direction": [0.6, 0.8]})
        task = ant.get_task()
        task["direction"][0] = 5.0
        task["extra"] = 1
        assert ant.get_task() == {"direction": [0.6, 0.8]}
        np.testing.assert_array_equal(ant._direction, [0.6, 0.8])


def test_constructor_task_and_ranges():
    with make("HalfCheetahVel", task={"velocity": 0.25}) as env:
        assert env.unwrapped.get_task() == {"velocity": 0.25}
    with make("AntVel", velocity_range=(1.0, 2.0)) as env:
        assert env.unwrapped.get_task() == {"velocity": 1.5}
        env.reset(seed=0)
        assert all(1.0 <= t["velocity"] <= 2.0 for t in env.unwrapped.sample_tasks(20))
        with pytest.raises(TaskOutOfRange, match=r"\[1.0, 2.0\]"):
            env.unwrapped.set_task({"velocity": 2.5})
    with make("AntGoal", goal_range=(-1.0, 1.0)) as env:
        assert env.unwrapped.get_task() == {"goal": [0.0, 0.0]}
    with pytest.raises(InvalidTask, match="'direction'"), make("HalfCheetahDir", task={"direction": 0}):
        pass
    with pytest.raises(ValueError, match="velocity_range"), make("HalfCheetahVel", velocity_range=(2.0, 0.0)):
        pass


def test_pickle_and_deepcopy_keep_the_current_task():
    with make("AntGoal") as env:
        ant = env.unwrapped
        ant.set_task({"goal": [1.0, -2.0]})
        for clone in (pickle.loads(pickle.dumps(ant)), copy.deepcopy(ant)):
            assert type(clone) is type(ant)
            assert clone.get_task() == {"goal": [1.0, -2.0]}
            assert clone.observation_space.shape == (107,)


BAD_TASKS = [
    # family, task, error, message fragments
    ("HalfCheetahVel", {}, InvalidTask, ["missing", "velocity", "[0.0, 2.0]"]),
    ("HalfCheetahVel", {"velocity": 1.0, "speed": 1.0}, InvalidTask, ["unknown", "speed", "velocity"]),
    ("HalfCheetahVel", {"velocity": "fast"}, InvalidTask, ["'velocity'", "a number in [0.0, 2.0]"]),
    ("HalfCheetahVel", {"velocity": [1.0]}, InvalidTask, ["'velocity'", "[0.0, 2.0]"]),
    ("HalfCheetahVel", {"velocity": float("nan")}, InvalidTask, ["'velocity'", "finite"]),
    ("HalfCheetahVel", {"velocity": 2.5}, TaskOutOfRange, ["'velocity'", "[0.0, 2.0]"]),
    ("HalfCheetahVel", [1.0], InvalidTask, ["dict", "velocity"]),
    ("HalfCheetahDir", {"direction": 0}, InvalidTask, ["'direction'", "one of [-1, 1]"]),
    ("HalfCheetahDir", {"direction": True}, InvalidTask, ["'direction'", "one of [-1, 1]"]),
    ("HalfCheetahDir", {"direction": "forward"}, InvalidTask, ["'direction'", "one of [-1, 1]"]),
    ("AntVel", {"velocity": -0.5}, TaskOutOfRange, ["'velocity'", "[0.0, 3.0]"]),
    ("AntDir", {"direction": 2}, InvalidTask, ["'direction'", "one of [-1, 1]"]),
    ("AntDir2D", {"direction": [0.5, 0.5]}, InvalidTask, ["'direction'", "unit vector", "norm 0.707"]),
    ("AntDir2D", {"direction": [2.0, 0.0]}, InvalidTask, ["'direction'", "unit vector"]),
    ("AntDir2D", {"direction": [1.0, 0.0, 0.0]}, InvalidTask, ["'direction'", "unit vector of 2 numbers"]),
    ("AntDir2D", {"direction": 1.0}, InvalidTask, ["'direction'", "unit vector"]),
    ("AntDir2D", {"direction": ["a", "b"]}, InvalidTask, ["'direction'", "unit vector"]),
    ("AntGoal", {"goal": [4.0, 0.0]}, TaskOutOfRange, ["'goal'", "[-3.0, 3.0]"]),
    ("AntGoal", {"goal": 1.0}, InvalidTask, ["'goal'", "a list of 2 numbers in [-3.0, 3.0]"]),
    ("AntGoal", {"target": [0.0, 0.0]}, InvalidTask, ["unknown", "target", "goal"]),
]


@pytest.mark.parametrize("family, task, error, fragments", BAD_TASKS, ids=[f"{f}-{t!r}" for f, t, _, _ in BAD_TASKS])
def test_bad_tasks_raise_clear_errors(family, task, error, fragments):
    with make(family) as env:
        before = env.unwrapped.get_task()
        with pytest.raises(error) as raised:
            env.unwrapped.set_task(task)
        if error is InvalidTask:
            assert not isinstance(raised.value, TaskOutOfRange)
        for fragment in fragments:
            assert fragment in str(raised.value)
        assert env.unwrapped.get_task() == before  # a rejected task changes nothing


@pytest.mark.parametrize(
    "family, task",
    [("HalfCheetahVel", {"velocity": 2.5}), ("AntVel", {"velocity": -0.5}), ("AntGoal", {"goal": [4.0, 0.0]})],
)
def test_allow_out_of_range_warns_and_applies(family, task):
    with make(family) as env:
        with pytest.warns(UserWarning, match=r"outside the range"):
            env.unwrapped.set_task(task, allow_out_of_range=True)
        assert env.unwrapped.get_task() == task
        env.reset(seed=0)
        _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        assert reward == pytest.approx(expected_reward(family, task, info), abs=1e-12)


def test_non_unit_direction_is_invalid_even_when_out_of_range_is_allowed():
    with make("AntDir2D") as env:
        with pytest.raises(InvalidTask, match="'direction'.*unit vector"):
            env.unwrapped.set_task({"direction": [0.5, 0.5]}, allow_out_of_range=True)
        env.unwrapped.set_task({"direction": [1.0 + 5e-7, 0.0]}, allow_out_of_range=True)  # within 1e-6
        with pytest.raises(InvalidTask, match="norm"):
            env.unwrapped.set_task({"direction": [1.0 + 5e-6, 0.0]}, allow_out_of_range=True)
