"""`metarl adapt` and the Python API: adapt a meta-trained policy to a new task, save, reload, act."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import metarl

ROOT = Path(__file__).resolve().parents[1]
TINY = ["num_iterations=2", "meta_batch_size=2", "episodes_per_task=2", "horizon=20", "policy.hidden=[8]", "threads=1"]


def metarl_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "metarl", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("nav") / "run"
    result = metarl_cli(
        "train", str(ROOT / "experiments/navigation2d/maml_trpo.yaml"), "--run-dir", str(run), "--no-progress", *TINY
    )
    assert result.returncode == 0, result.stderr
    return run


def test_cli_adapt_prints_returns_and_saves_a_reloadable_policy(run_dir, tmp_path):
    out = tmp_path / "adapted"
    result = metarl_cli(
        "adapt", str(run_dir), "--task", '{"goal": [0.3, -0.2]}', "--episodes", "4", "--steps", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in table] == [0, 1, 2]
    info = json.loads((out / "adapted.json").read_text())
    assert info["task"] == {"goal": [0.3, -0.2]} and info["steps"] == 2 and info["episodes"] == 4
    assert [round(r, 2) for r in info["returns"]] == [float(row[1]) for row in table]
    adapted = metarl.load_adapted(out)
    # the same adaptation from Python (same seed) gives the same parameters and actions
    again = metarl.load(run_dir).adapt({"goal": [0.3, -0.2]}, episodes=4, steps=2, seed=0)
    for k, v in again.params.items():
        assert torch.equal(v, adapted.params[k]), k
    obs = np.random.default_rng(0).uniform(-0.5, 0.5, size=(16, 2)).astype(np.float32)
    np.testing.assert_array_equal(adapted.act(obs), again.act(obs))
    assert again.returns == info["returns"]


def test_python_adapt_runs_in_a_plain_gymnasium_loop(run_dir):
    meta = metarl.load(run_dir)
    adapted = meta.adapt({"goal": [-0.2, 0.4]}, episodes=3, steps=1, seed=5)
    assert len(adapted.returns) == 2
    assert not torch.equal(adapted.params["out.weight"], meta.params["out.weight"])  # it moved
    env = adapted.make_env()
    obs, _ = env.reset(seed=0)
    total = 0.0
    for _ in range(5):
        action = adapted.act(obs)
        assert action.shape == (2,) and np.all(np.abs(action) <= 0.1)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
    assert env.unwrapped.get_task() == {"goal": [-0.2, 0.4]} and np.isfinite(total)
    zero = meta.adapt({"goal": [-0.2, 0.4]}, episodes=3, steps=0)
    assert len(zero.returns) == 1 and all(torch.equal(zero.params[k], meta.params[k]) for k in meta.params)


def test_bad_tasks_are_named_and_out_of_range_warns(run_dir, tmp_path):
    result = metarl_cli("adapt", str(run_dir), "--task", '{"goal": [0.3]}')
    assert result.returncode == 2 and "'goal'" in result.stderr and "Traceback" not in result.stderr
    result = metarl_cli("adapt", str(run_dir), "--task", '{"velocity": 1.0}')
    assert result.returncode == 2 and "velocity" in result.stderr
    result = metarl_cli("adapt", str(run_dir), "--task", '{"goal": [0.3')
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    result = metarl_cli("adapt", str(run_dir), "--task-index", "3")
    assert result.returncode == 2 and "Meta-World" in result.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metarl.load(run_dir).adapt({"goal": [0.9, 0.0]}, episodes=2, steps=1)
    assert any("training range" in str(w.message) for w in caught)
    result = metarl_cli("adapt", str(tmp_path), "--task", '{"goal": [0.3, 0.3]}')
    assert result.returncode == 2 and "not a metarl run directory" in result.stderr


def test_cli_export_writes_an_sb3_model_that_acts_like_the_policy(run_dir, tmp_path):
    from stable_baselines3 import PPO

    adapted_dir = tmp_path / "adapted"
    assert (
        metarl_cli(
            "adapt", str(run_dir), "--task", '{"goal": [0.1, 0.4]}', "--episodes", "2", "--out", str(adapted_dir)
        ).returncode
        == 0
    )
    obs = np.random.default_rng(1).uniform(-0.5, 0.5, size=(8, 2)).astype(np.float32)
    for source, policy in ((run_dir, metarl.load(run_dir)), (adapted_dir, metarl.load_adapted(adapted_dir))):
        zip_path = tmp_path / f"{source.name}.zip"
        result = metarl_cli("export", str(source), "--sb3", str(zip_path))
        assert result.returncode == 0, result.stderr
        model = PPO.load(zip_path, device="cpu")
        np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], policy.act(obs), rtol=0, atol=1e-6)
    result = metarl_cli("export", str(tmp_path / "nothing"), "--sb3", str(tmp_path / "x.zip"))
    assert result.returncode == 2 and "not a metarl run directory" in result.stderr


def test_cli_plot_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "curves.png"
    result = metarl_cli("plot", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "return/pre_adapt" in result.stdout
    result = metarl_cli("plot", str(run_dir), "--keys", "return/nope")
    assert result.returncode == 2 and "return/nope" in result.stderr


def test_evaluate_with_baselines_scores_every_method_on_a_tiny_budget(run_dir, tmp_path):
    out = tmp_path / "baselines.json"
    budget = [
        "--num-tasks",
        "2",
        "--steps",
        "1",
        "--pretrain-steps",
        "400",
        "--oracle-steps",
        "400",
        "--oracle-tasks",
        "1",
    ]
    on_ray, in_process = tmp_path / "on_ray", tmp_path / "in_process"
    for copy in (on_ray, in_process):
        shutil.copytree(run_dir, copy)
    # the PPO jobs as Ray tasks on a local Ray (2 CPUs)
    result = metarl_cli("evaluate", str(on_ray), "--baselines", *budget, "--jobs", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    ev = json.loads(out.read_text())
    assert ev["metric"] == "return" and ev["steps"] == [0, 1] and ev["num_tasks"] == 2 and ev["jobs"] == 2
    assert set(ev["methods"]) == {"meta", "random_init", "pretrained", "ppo_scratch", "oracle"}
    for name, m in ev["methods"].items():
        assert len(m["mean"]) == len(m["ci95"]) == 2 and all(np.isfinite(m["mean"])), name
    assert (
        ev["methods"]["oracle"]["num_tasks"] == 1
        and ev["methods"]["oracle"]["mean"][0] == ev["methods"]["oracle"]["mean"][1]
    )
    assert ev["methods"]["pretrained"]["pretrain_env_steps"] == 400
    assert (on_ray / "eval_baselines.png").read_bytes()[:4] == b"\x89PNG"
    assert list((on_ray / "eval").glob("events.out.tfevents.*"))
    progress = [line for line in result.stderr.splitlines() if "baseline job " in line]
    assert sorted(line.split(":")[1].split()[0] for line in progress) == ["1/4", "2/4", "3/4", "4/4"]
    assert len(list((on_ray / "baseline_jobs").glob("*.pt"))) == 4

    # in this process (--jobs 1), killed once a job is done, then run again: the finished jobs are
    # reused and the figures are exactly those of the uninterrupted run on Ray
    command = [sys.executable, "-m", "metarl", "evaluate", str(in_process), "--baselines", *budget, "--jobs", "1"]
    killed = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((in_process / "baseline_jobs").glob("*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    kept = len(list((in_process / "baseline_jobs").glob("*.pt")))
    assert 1 <= kept < 4 and not (in_process / "eval_baselines.json").exists()
    result = metarl_cli("evaluate", str(in_process), "--baselines", *budget, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    assert f"baseline jobs: {kept} of 4 already done" in result.stderr
    assert sum("baseline job " in line for line in result.stderr.splitlines()) == 4 - kept  # one per job run
    again = json.loads((in_process / "eval_baselines.json").read_text())
    for name, m in ev["methods"].items():
        assert (again["methods"][name]["mean"], again["methods"][name]["ci95"]) == (m["mean"], m["ci95"]), name
    # the meta row is exactly `metarl evaluate` on the same tasks
    plain = tmp_path / "plain.json"
    assert (
        metarl_cli("evaluate", str(run_dir), "--num-tasks", "2", "--steps", "1", "--json", str(plain)).returncode == 0
    )
    assert json.loads(plain.read_text())["mean"] == ev["methods"]["meta"]["mean"]
    result = metarl_cli("evaluate", str(run_dir), "--baselines", *budget, "--jobs", "0")
    assert result.returncode == 2 and "--jobs must be >= 1, got 0" in result.stderr


def test_video_is_recorded_or_explained(run_dir, tmp_path):
    import gymnasium as gym

    from metarl.app.adapt import VideoUnavailable, record_video

    # a family without a renderer: a clear message and exit status 0 (the adapted policy is saved)
    result = metarl_cli(
        "adapt",
        str(run_dir),
        "--task",
        '{"goal": [0.2, 0.2]}',
        "--episodes",
        "2",
        "--video",
        "--out",
        str(tmp_path / "a"),
    )
    assert result.returncode == 0 and "no video" in result.stderr and (tmp_path / "a" / "policy.pt").exists()

    class Zero:
        def act(self, obs, deterministic=True):
            return np.zeros(6, dtype=np.float32)

    env = gym.make("HalfCheetah-v5", render_mode="rgb_array", max_episode_steps=5)
    try:
        path = record_video(Zero(), env, tmp_path / "cheetah.gif")
    except VideoUnavailable as exc:  # this machine has no OpenGL: the message says how to get one
        assert "MUJOCO_GL" in str(exc)
    else:
        from PIL import Image

        with Image.open(path) as gif:
            assert gif.n_frames == 6
    finally:
        env.close()


def test_ppo_baselines_act_in_env_units_with_the_runs_action_scale():
    """With action_scale 10 on HalfCheetah's [-1, 1], PPO starts at the policy's std seen through the
    map (init_std 1 -> 0.1), and a multi-task PPO actor (env units) is adapted as the same policy."""
    import math

    from metarl.app.comparisons import PPOSetting, _policy_kwargs, pretrained_curve
    from metarl.app.export import fold_action_scale
    from metarl.core.config import from_dict
    from metarl.runs.experiment import TEST
    from metarl.runs.rl import RLExperiment
    from metarl.runs.rl_config import RLConfig

    cfg = from_dict(
        RLConfig,
        {
            "family": "HalfCheetahVel",
            "algorithm": "maml_trpo",
            "num_iterations": 1,
            "action_scale": 10.0,
            "horizon": 10,
            "episodes_per_task": 2,
            "meta_batch_size": 2,
        },
    )
    exp = RLExperiment(cfg)
    try:
        setting = PPOSetting.of(exp)
        assert setting.action_std_factor == pytest.approx(0.1)
        assert _policy_kwargs(setting)["log_std_init"] == pytest.approx(math.log(0.1))
        own = {k: v.detach().clone() for k, v in exp.policy.params().items()}
        env_units = fold_action_scale(own, exp.task_envs[TEST].action_space, 10.0)  # the same behaviour in PPO
        adapted = pretrained_curve(exp, env_units, num_tasks=2, steps=1, seed=0)
        np.testing.assert_allclose(adapted, exp.curve(TEST, 0, 2, steps=1), rtol=1e-4, atol=1e-3)
        unmapped = pretrained_curve(exp, own, num_tasks=2, steps=1, seed=0)  # had it not been mapped back
        assert not np.allclose(unmapped, adapted, atol=1e-2)
    finally:
        exp.close()


# ----------------------------------------------------------------------------- RL^2


@pytest.fixture(scope="module")
def rl2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("nav_rl2") / "run"
    overrides = ["num_iterations=1", "meta_batch_size=2", "episodes_per_task=4", "episodes_per_trial=2", "horizon=15",
                 "policy.rnn_size=8", "ppo.epochs=1", "threads=1"]  # fmt: skip
    result = metarl_cli(
        "train", str(ROOT / "experiments/navigation2d/rl2.yaml"), "--run-dir", str(run), "--no-progress", *overrides
    )
    assert result.returncode == 0, result.stderr
    return run


def test_rl2_adapts_by_a_trial_and_keeps_its_state(rl2_run, tmp_path):
    from metarl.rl.sampling import task_seeds
    from metarl.rl.trials import trial_sequences
    from metarl.runs.experiment import TEST

    out = tmp_path / "adapted"
    result = metarl_cli("adapt", str(rl2_run), "--task", '{"goal": [0.3, -0.2]}', "--episodes", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in table] == [1, 2, 3]  # the return of each episode of the trial
    adapted = metarl.load_adapted(out)
    assert set(adapted.context) == {"state", "prev_action", "prev_reward", "done"} and adapted.context["done"] == 1
    # the state is the recurrent network's after the first trial's last step, computed independently by
    # torch.nn.GRU over the same trial (re-sampled with the adaptation's seed)
    meta = metarl.load(rl2_run)
    sampler = meta.experiment.sampler(test=True, episodes=2 * 3, episodes_per_trial=3)
    episodes = sampler.sample(meta.params, [{"goal": [0.3, -0.2]}], task_seeds(meta.cfg.seed, TEST, 7, 0, n=1))
    seqs = trial_sequences(episodes, 3)
    with torch.no_grad():
        x = meta.policy.inputs(seqs.observations, seqs.prev_actions, seqs.prev_rewards, seqs.done)
        hidden = meta.policy.sequence(x[:1])
    last = int(seqs.mask[0].sum()) - 1
    torch.testing.assert_close(adapted.context["state"], hidden[0, last], rtol=1e-5, atol=1e-5)
    assert torch.equal(adapted.context["prev_action"], seqs.actions[0, last])
    assert adapted.returns == pytest.approx(
        episodes.returns_per_episode().view(1, 2, 3).mean(1)[0].tolist()
    )  # the mean over the run's two trials per task
    # acting continues the trial: the state moves, the done flag clears, observe() stores the reward
    env = adapted.make_env()
    obs, _ = env.reset(seed=1)
    before = adapted.context["state"].clone()
    action = adapted.act(obs)
    assert action.shape == (2,) and not torch.equal(adapted.context["state"], before)
    assert adapted.context["done"] == 0
    adapted.observe(-0.25, done=True)
    assert adapted.context["prev_reward"] == -0.25 and adapted.context["done"] == 1
    # no SB3 equivalent: one line, exit 2
    result = metarl_cli("export", str(rl2_run), "--sb3", str(tmp_path / "x.zip"))
    assert result.returncode == 2 and "recurrent (RL^2) policy has no stable-baselines3" in result.stderr
    assert not (tmp_path / "x.zip").exists()
    # --keep best has no meaning for a trial
    result = metarl_cli("adapt", str(rl2_run), "--task", '{"goal": [0.3, -0.2]}', "--keep", "best")
    assert result.returncode == 2 and "--keep best does not apply to RL^2" in result.stderr
