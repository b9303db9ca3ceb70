"""The batched Meta-World path (envs.metaworld_batch) against MetaWorldEnv.step, task by task.

Every env class of ML1 reach-v3 / push-v3 and of ML10's train and test splits runs a whole episode
(Meta-World's 500 steps, to truncation) with random actions in a batch, and the same episode in its
own reference env (one reference per batch env, so both have the same history: a Meta-World reset
starts from the previous episode's solver state). Then every env gets another class's task (or
another goal), is reset and runs again. Observations, rewards, success flags and truncations must
be equal, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from metaworld.policies import ENV_POLICY_MAP

from envs import metaworld_batch
from envs.metaworld_batch import MetaWorldBatch
from envs.metaworld_tasks import MetaWorldEnv

HORIZON = 500


def _compare(
    rounds: list[list[dict]], *, steps: int = HORIZON, threads: int = 1, scripted: bool = False, **kwargs
) -> dict[str, float]:
    """Run ``rounds`` in a batch and in reference envs; ``scripted``: Meta-World's expert policies act."""
    n = len(rounds[0])
    reference = [MetaWorldEnv(**kwargs) for _ in range(n)]
    batch = MetaWorldBatch([MetaWorldEnv(**kwargs) for _ in range(n)], threads=threads)
    rng = np.random.default_rng(3)
    seen = {"success": 0.0, "truncations": 0, "grasp": 0.0}
    for r, tasks in enumerate(rounds):
        experts = [ENV_POLICY_MAP[task["env_name"]]() for task in tasks] if scripted else []
        for env, task in zip(reference, tasks):
            env.set_task(task)
        batch.set_tasks(tasks)
        seeds = [10 * r + i for i in range(n)]
        expected = np.stack([env.reset(seed=s)[0] for env, s in zip(reference, seeds)])
        np.testing.assert_array_equal(batch.reset(seeds), expected)
        obs = expected
        for t in range(steps):
            expected_obs = np.empty_like(obs)
            actions = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
            if scripted:  # the expert's action (shown the goal ML1 hides) plus noise
                shown = [np.concatenate([o[:36], env._env._target_pos]) for o, env in zip(obs, reference)]
                actions = np.clip([e.get_action(o) for e, o in zip(experts, shown)] + 0.3 * actions, -1, 1)
                actions = actions.astype(np.float32)
            obs, reward, terminated, truncated, infos = batch.step(actions)
            for i, env in enumerate(reference):
                o, rew, te, tr, info = env.step(actions[i])
                expected_obs[i] = o
                where = f"{tasks[i]} step {t}"
                np.testing.assert_array_equal(obs[i], o, err_msg=where)
                assert reward[i] == rew, where
                assert (bool(terminated[i]), bool(truncated[i])) == (te, tr), where
                assert infos[i] == info, where
                seen["success"] += info["success"]
                seen["truncations"] += tr
                seen["grasp"] += info.get("grasp_success", 0.0)
            obs = expected_obs
    return seen


def _classes(split_env: MetaWorldEnv) -> list[dict]:
    return [{"env_name": name, "index": i % 50} for i, name in enumerate(split_env.env_names)]


@pytest.mark.parametrize("task_name", ["reach-v3", "push-v3"])
def test_ml1_batched_step_equals_metaworld(task_name):
    rounds = [
        [{"env_name": task_name, "index": i} for i in (0, 17, 33)],
        [{"env_name": task_name, "index": i} for i in (5, 49, 0)],
    ]
    seen = _compare(rounds, benchmark="ML1", task_name=task_name)
    assert seen["truncations"] == 2 * 3  # every episode reached Meta-World's horizon


def test_grasping_episodes_equal_metaworld():
    """Meta-World's expert picks the object up: grasp_success (the pads press on it) must match."""
    rounds = [[{"env_name": "pick-place-v3", "index": i} for i in (2, 40)]]
    seen = _compare(rounds, steps=150, scripted=True, benchmark="ML1", task_name="pick-place-v3")
    assert seen["grasp"] > 50  # the answer "touching" mattered in many steps


def test_touching_object_matches_metaworld_on_contact_states():
    """_touching_object against Meta-World's touching_object on every state of noisy expert episodes.

    Counts the states where both pads, exactly one pad and no pad press on the puck: each kind must
    occur, so a swapped pad, an "or" for the "and" or a missed force term would show.
    """
    env = MetaWorldEnv(benchmark="ML1", task_name="pick-place-v3")
    expert = ENV_POLICY_MAP["pick-place-v3"]()
    rng = np.random.default_rng(0)
    inner = env._env
    object_id = inner._get_id_main_object()
    pads = (inner.model.geom("leftpad_geom").id, inner.model.geom("rightpad_geom").id)
    kinds = {"both": 0, "one": 0, "none": 0}
    for episode in range(3):
        env.set_task({"env_name": "pick-place-v3", "index": episode})
        obs, _ = env.reset(seed=episode)
        for _ in range(120):
            action = np.clip(expert.get_action(obs) + 0.5 * rng.uniform(-1, 1, 4), -1, 1).astype(np.float32)
            obs = env.step(action)[0]
            pressing = [_pad_force(inner, pad, object_id) > 0 for pad in pads]
            expected = type(inner).touching_object(inner, object_id)  # Meta-World's own method
            assert metaworld_batch._touching_object(inner, pads, object_id) == expected
            assert expected == all(pressing)
            kinds[("none", "one", "both")[sum(pressing)]] += 1
    assert min(kinds.values()) > 0, kinds


def _pad_force(inner, pad: int, object_id: int) -> float:
    """Normal force between one pad and the object: the contacts' efc_force, walked one by one."""
    data = inner.data
    return sum(
        data.efc_force[data.contact.efc_address[c]]
        for c in range(data.ncon)
        if {pad, object_id} == {int(data.contact.geom1[c]), int(data.contact.geom2[c])}
    )


def test_ml10_train_batched_step_equals_metaworld():
    classes = _classes(MetaWorldEnv(benchmark="ML10", split="train"))
    assert len(classes) == 10
    # five rounds of two envs (building an ML10 env builds all its classes: few envs, many rounds):
    # every train class, and every env changes class between rounds
    _compare([classes[k : k + 2] for k in range(0, 10, 2)], benchmark="ML10", split="train", threads=2)


def test_ml10_test_batched_step_equals_metaworld():
    classes = _classes(MetaWorldEnv(benchmark="ML10", split="test"))
    assert len(classes) == 5
    _compare([classes[0:2], classes[2:4], [classes[4], classes[0]]], benchmark="ML10", split="test")


def test_batched_step_needs_a_reset():
    batch = MetaWorldBatch([MetaWorldEnv(benchmark="ML1", task_name="reach-v3")])
    with pytest.raises(RuntimeError, match="reset"):
        batch.step(np.zeros((1, 4)))


def test_lazily_built_classes_give_the_episodes_of_an_eagerly_built_env():
    from envs import metaworld_pool, metaworld_tasks

    metaworld_tasks._TASK_CACHE.clear()
    metaworld_pool.IDLE.clear()
    eager = MetaWorldEnv(benchmark="ML10", split="test")  # draws the goals: builds every class
    # it keeps its first class and hands the other four to the idle pool
    assert len(eager._envs) == 1 and sorted(len(v) for v in metaworld_pool.IDLE.values()) == [1, 1, 1, 1]
    eagerly_built = {type(e): e for idle in metaworld_pool.IDLE.values() for e in idle}
    eagerly_built[type(eager.metaworld_env)] = eager.metaworld_env
    metaworld_pool.IDLE.clear()
    lazy = MetaWorldEnv(benchmark="ML10", split="test")  # reuses the goals: builds a class on first use
    assert len(lazy._envs) == 1 and lazy.metaworld_env is not eager.metaworld_env
    assert lazy._mw_tasks is eager._mw_tasks
    rng = np.random.default_rng(0)
    for task in ({"env_name": lazy.env_names[3], "index": 7}, {"env_name": lazy.env_names[0], "index": 2}):
        cls = eager._classes[task["env_name"]]
        metaworld_pool.IDLE.clear()
        metaworld_pool.IDLE[(cls, None, None)] = [eagerly_built[cls]]
        eager.set_task(task)  # takes the eagerly built instance
        metaworld_pool.IDLE.clear()
        lazy.set_task(task)  # builds one
        assert eager.metaworld_env is eagerly_built[cls] and lazy.metaworld_env is not eagerly_built[cls]
        np.testing.assert_array_equal(eager.reset(seed=1)[0], lazy.reset(seed=1)[0])
        for _ in range(100):
            action = rng.uniform(-1, 1, 4).astype(np.float32)
            a, b = eager.step(action), lazy.step(action)
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1:] == b[1:]
    metaworld_pool.IDLE.clear()


def test_an_env_the_batch_has_stepped_is_freed_when_dropped(monkeypatch):
    import gc
    import weakref

    from envs import metaworld_pool

    monkeypatch.setattr(metaworld_pool, "IDLE", {})
    monkeypatch.setattr(metaworld_pool, "IDLE_PER_CLASS", 0)  # every env a slot switches away from is dropped
    batch = MetaWorldBatch([MetaWorldEnv(benchmark="ML10", split="test") for _ in range(2)])
    dropped = []
    gc.disable()  # freed by reference counting alone, as soon as dropped (no cycle through the batch's patch)
    try:
        for name in ("drawer-open-v3", "door-close-v3", "lever-pull-v3"):
            batch.set_tasks([{"env_name": name, "index": 0}] * 2)
            batch.reset([0, 1])
            batch.step(np.zeros((2, 4)))
            dropped.append([weakref.ref(env._env) for env in batch.envs])
        assert [[ref() is None for ref in refs] for refs in dropped] == [[True, True], [True, True], [False, False]]
    finally:
        gc.enable()
        batch.close()
