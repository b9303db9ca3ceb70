"""Meta-World's own evaluation protocol: every kind of agent runs ``metalearning_evaluation`` on a
tiny run, the adaptation episodes are cut from the collected steps exactly, and every sub-env's
evaluation episodes are counted (beside Metaworld 3.0's own first-per-class count)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import metarl
from metarl.app.metaworld_agent import GradientAgent, InferenceAgent, RecurrentAgent, _episodes_of
from metarl.app.metaworld_eval import evaluate_every_sub_env, score

ROOT = Path(__file__).resolve().parents[1]
PEARL_TINY = [
    "pearl.train_tasks=2",
    "pearl.initial_steps=20",
    "pearl.tasks_per_iteration=1",
    "pearl.prior_steps=20",
    "pearl.extra_rl_steps=20",
    "pearl.gradient_steps=2",
    "pearl.hidden=[8]",
    "pearl.encoder_hidden=[8]",
    "pearl.batch_size=4",
    "pearl.context_size=4",
]
TINY = ["num_iterations=1", "meta_batch_size=2", "episodes_per_task=2", "horizon=20", "ray.workers=0", "threads=1"]


def _train(tmp_path_factory, config, *extra):
    run = tmp_path_factory.mktemp("mw") / "run"
    cmd = [sys.executable, "-m", "metarl", "train", str(ROOT / config), "--run-dir", str(run), "--no-progress"]
    result = subprocess.run([*cmd, *TINY, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return run


def test_collected_steps_become_each_sub_envs_episodes():
    # 2 sub-envs, 5 steps: sub-env 0 ends episodes after steps 1 (terminated) and 4 (truncated);
    # sub-env 1 after step 4 only. E = 1 (the fewest completed), H = the longest of those kept.
    t = np.arange(5, dtype=float)
    buffer = {
        "obs": [np.array([[s, 0.0], [s, 1.0]]) for s in t],
        "act": [np.array([[10 + s], [20 + s]]) for s in t],
        "rew": [np.array([s, -s]) for s in t],
        "term": [np.array([s == 1, False]) for s in t],
        "trunc": [np.array([s == 4, s == 4]) for s in t],
    }
    eps = _episodes_of(buffer)
    assert tuple(eps.observations.shape) == (2, 5, 1, 2)
    assert eps.lengths.tolist() == [[2], [5]] and eps.terminated.tolist() == [[True], [False]]
    assert eps.rewards[0, :, 0].tolist() == [0, 1, 0, 0, 0] and eps.rewards[1, :, 0].tolist() == [0, -1, -2, -3, -4]
    assert eps.actions[1, :, 0, 0].tolist() == [20, 21, 22, 23, 24]
    assert eps.mask[0, :, 0].tolist() == [1, 1, 0, 0, 0]


class _ScriptedEnvs:
    """Two reach-v3 sub-envs with scripted episodes, one reward per step: sub-env 0's episodes succeed
    and end (terminate on success) at their 2nd step; sub-env 1's are truncated at step 5, unsuccessful."""

    num_envs = 2

    def __init__(self):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.class_name = ALL_V3_ENVIRONMENTS["reach-v3"].__name__
        self.t = np.zeros(2, dtype=int)
        self.terminate_on_success = False

    def get_attr(self, name):
        return {"terminate_on_success": (self.terminate_on_success,) * 2, "task_name": (self.class_name,) * 2}[name]

    def call(self, name, *args):
        assert name == "toggle_terminate_on_success"
        self.terminate_on_success = args[0]

    def reset(self):
        self.t[:] = 0
        return np.zeros((2, 1)), {}

    def step(self, actions):
        assert self.terminate_on_success  # the evaluation runs with it on
        self.t += 1
        terminated, truncated = np.array([self.t[0] == 2, False]), np.array([False, self.t[1] == 5])
        done = terminated | truncated
        info = {"final_info": {"episode": {"r": self.t.astype(float)}, "success": np.array([True, False]) & done}}
        self.t[done] = 0
        return np.zeros((2, 1)), np.ones(2), terminated, truncated, info


class _ZeroAgent:
    def eval_action(self, obs):
        return np.zeros((len(obs), 4))

    def reset(self, mask):
        pass


def test_every_sub_envs_episodes_are_counted_and_metaworlds_count_is_kept():
    """By hand, 2 episodes each: sub-env 0 succeeds twice (episodes of 2 steps), sub-env 1 fails twice
    (5 steps): success 0.5, return (2 + 2 + 5 + 5) / 4. Metaworld 3.0 counts the first 2 episodes of
    the class to finish, both sub-env 0's: success 1.0, return 2. Its own ``evaluation`` agrees."""
    from metaworld.evaluation import evaluation

    envs = _ScriptedEnvs()
    every, shipped = evaluate_every_sub_env(_ZeroAgent(), envs, num_episodes=2)
    assert every == {"success": 0.5, "return": 3.5, "per_task": {"reach-v3": 0.5}}
    assert shipped == (1.0, 2.0, {"reach-v3": 1.0}, {"reach-v3": [2.0, 2.0]})
    assert not envs.terminate_on_success  # the toggle is put back
    assert evaluation(_ZeroAgent(), _ScriptedEnvs(), 2) == shipped


@pytest.mark.parametrize(
    "config, extra, kind",
    [
        ("experiments/metaworld_ml1_reach/maml_trpo.yaml", [], GradientAgent),
        ("experiments/metaworld_ml1_reach/promp.yaml", ["promp.steps=1"], GradientAgent),
        ("experiments/metaworld_ml1_reach/rl2.yaml", ["episodes_per_trial=2", "policy.rnn_size=8", "ppo.epochs=1"],
         RecurrentAgent),
        ("experiments/metaworld_ml1_reach/pearl.yaml", PEARL_TINY, InferenceAgent),
    ],
)  # fmt: skip
def test_agents_run_metaworlds_own_evaluation(tmp_path_factory, config, extra, kind):
    meta = metarl.load(_train(tmp_path_factory, config, *extra))
    agent = meta.metaworld_agent()
    assert isinstance(agent, kind)
    for method in ("init", "adapt_action", "step", "adapt", "eval_action", "reset"):  # MetaLearningAgent
        assert callable(getattr(agent, method))
    from metaworld.evaluation import metalearning_evaluation

    from metarl.app.metaworld_eval import make_eval_envs

    envs = make_eval_envs(meta.cfg, meta_batch_size=2)
    try:
        success, mean_return, per_task = metalearning_evaluation(
            agent, envs, num_evals=1, adaptation_steps=1, adaptation_episodes=1, evaluation_episodes=1
        )
    finally:
        envs.close()
    assert 0.0 <= success <= 1.0 and np.isfinite(mean_return) and set(per_task) == {"reach-v3"}
    if kind is GradientAgent:  # adapt() took the run's inner step: each sub-env has its own parameters
        assert len(agent.steps) == 1 and agent.steps[0].episodes.lengths.tolist() == [[500], [500]]
        for name, theta in agent.theta.items():
            assert agent.params[name].shape == (2, *theta.shape)
            assert not torch.equal(agent.params[name][0], agent.params[name][1])
    elif kind is InferenceAgent:  # each sub-env's z: the posterior mean of its 500 adaptation steps
        assert [len(c) for c in agent.contexts] == [500, 500]
        for i in range(2):
            expected = meta.experiment.posterior_mean(torch.stack(agent.contexts[i]))
            torch.testing.assert_close(agent.z[i], expected)
        assert not torch.equal(agent.z[0], agent.z[1])
    else:  # the trial's state ran through adaptation and evaluation
        assert agent.state.shape == (2, 1, 8) and agent.state.abs().max() > 0
    if config.endswith("maml_trpo.yaml"):  # on real envs, the first-per-class count is Metaworld's own
        from metaworld.evaluation import evaluation

        counts = []
        for count in (evaluation, lambda *a: evaluate_every_sub_env(*a)[1]):
            envs = make_eval_envs(meta.cfg, meta_batch_size=2)
            envs.call("toggle_sample_tasks_on_reset", False)  # goals as metalearning_evaluation sets them
            envs.call("sample_tasks")
            agent = meta.metaworld_agent(seed=3)
            agent.init()
            try:
                counts.append(count(agent, envs, 2))
            finally:
                envs.close()
        assert counts[0] == counts[1] and len(counts[0][3]["reach-v3"]) == 2
    if config.endswith("maml_trpo.yaml"):  # score() is the same protocol with the run's settings
        assert set(score(meta, num_evals=1, adaptation_episodes=1, evaluation_episodes=1, meta_batch_size=2)[2]) == {
            "reach-v3"
        }


def test_metaworld_agent_needs_a_metaworld_run(tmp_path_factory):
    meta = metarl.load(_train(tmp_path_factory, "experiments/navigation2d/maml_trpo.yaml", "policy.hidden=[8]"))
    with pytest.raises(ValueError, match="needs a Meta-World run"):
        meta.metaworld_agent()
    assert torch.is_tensor(next(iter(meta.params.values())))


def test_cli_evaluate_metaworld_writes_success_rates_per_split(tmp_path_factory):
    import json

    run = _train(tmp_path_factory, "experiments/metaworld_ml1_reach/maml_trpo.yaml")
    cmd = [sys.executable, "-m", "metarl", "evaluate", str(run), "--metaworld", "--num-evals", "2",
           "--adaptation-episodes", "1", "--evaluation-episodes", "1", "--meta-batch-size", "2"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = json.loads((run / "eval_metaworld.json").read_text())
    assert out["metric"] == "success" and out["settings"]["protocol"] == "metaworld.evaluation.metalearning_evaluation"
    for split in ("train", "test"):
        r = out["splits"][split]
        rounds = [x["success"] for x in r["rounds"]]
        assert len(rounds) == 2 and r["steps"] == [1] and set(r["per_task"]) == {"reach-v3"}
        assert r["mean"] == [pytest.approx(np.mean(rounds))]  # the CI is over the rounds
        assert r["ci95"] == [pytest.approx(1.96 * np.std(rounds, ddof=1) / np.sqrt(2))]
        shipped = [x["metaworld_3_0"]["success"] for x in r["rounds"]]
        assert r["metaworld_3_0"]["mean"] == [pytest.approx(np.mean(shipped))]
        for i, x in enumerate(r["rounds"]):  # one progress line per round, with that round's figures
            assert (
                f"{split} split: round {i + 1}/2, success {x['success']:.3f}, return {x['return']:.1f}" in result.stderr
            )
    # a run of another family: one line, exit 2
    nav = _train(tmp_path_factory, "experiments/navigation2d/maml_trpo.yaml", "policy.hidden=[8]")
    result = subprocess.run([*cmd[:4], str(nav), "--metaworld"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--metaworld scores Meta-World runs" in result.stderr


def test_eval_env_settings_deal_each_class_goals_evenly():
    from types import SimpleNamespace

    from metarl.app.metaworld_eval import eval_env_settings, make_eval_envs
    from metarl.runs.load import load_experiment_config

    ml1 = SimpleNamespace(family="MetaWorld-ML1", env={"task_name": "reach-v3"}, policy=SimpleNamespace(recurrent=None))
    ml10 = load_experiment_config(ROOT / "experiments" / "metaworld_ml10" / "rl2.yaml")  # names no task
    # ML1's default 20 sub-envs share 40 of its 50 goals, 2 each (Meta-World's own assumption)
    assert eval_env_settings(ml1) == {"meta_batch_size": 20, "total_tasks_per_cls": 40}
    assert eval_env_settings(ml1, meta_batch_size=2) == {"meta_batch_size": 2, "total_tasks_per_cls": 50}
    assert eval_env_settings(ml1, meta_batch_size=3)["total_tasks_per_cls"] == 48
    assert eval_env_settings(ml10, split="train") == {"meta_batch_size": 50, "total_tasks_per_cls": 50}
    assert eval_env_settings(ml10, split="test") == {"meta_batch_size": 25, "total_tasks_per_cls": 50}
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        eval_env_settings(ml10, split="train", meta_batch_size=15)
    with pytest.raises(ValueError, match="at most 50"):
        eval_env_settings(ml1, meta_batch_size=60)
    for split in ("train", "test"):  # the defaults build (20 sub-envs of ML1 failed Meta-World's check before)
        envs = make_eval_envs(ml1, split=split)
        try:
            assert envs.num_envs == 20
        finally:
            envs.close()
    envs = make_eval_envs(ml10, split="test")  # an ML10 run's test split: 5 sub-envs of each test class
    try:
        from metaworld.evaluation import _get_task_names

        names = _get_task_names(envs)
        assert sorted(set(names)) == [
            "door-close-v3",
            "drawer-open-v3",
            "lever-pull-v3",
            "shelf-place-v3",
            "sweep-into-v3",
        ]
        assert all(names.count(name) == 5 for name in set(names))
    finally:
        envs.close()


def test_eval_envs_hold_the_goals_of_their_split():
    """Each split's sub-envs hold that split's goals of ``metaworld.ML1(task, seed)`` and none of
    the other's (Metaworld 3.0's ``Meta-World/ML1-train`` id builds the test split)."""
    from types import SimpleNamespace

    import metaworld

    from metarl.app.metaworld_eval import make_eval_envs

    ml1 = SimpleNamespace(
        family="MetaWorld-ML1", env={"task_name": "reach-v3", "seed": 3}, policy=SimpleNamespace(recurrent=None)
    )
    benchmark = metaworld.ML1("reach-v3", seed=3)
    goals = {split: {task.data for task in getattr(benchmark, f"{split}_tasks")} for split in ("train", "test")}
    assert len(goals["train"]) == len(goals["test"]) == 50 and not goals["train"] & goals["test"]
    for split in ("train", "test"):
        envs = make_eval_envs(ml1, split=split, meta_batch_size=2)
        try:
            held = {task.data for tasks in envs.get_attr("tasks") for task in tasks}
        finally:
            envs.close()
        assert held == goals[split]
