"""PEARL's experiment: what the buffers hold after collection, seeded determinism, a kill and resume
identical to an uninterrupted run, checkpoints with and without buffers, evaluation, bad configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.runs.load import load_experiment_config, make_experiment

TINY = """\
family: Navigation2D
algorithm: pearl
num_iterations: {iterations}
seed: 3
threads: 1
meta_batch_size: 3
episodes_per_task: 1
horizon: 10
action_scale: 1.0
checkpoint_every: 2
pearl:
  latent_dim: 2
  hidden: [16, 16]
  encoder_hidden: [8]
  train_tasks: 6
  initial_steps: 30
  tasks_per_iteration: 2
  prior_steps: 10
  posterior_steps: 10
  extra_rl_steps: 20
  gradient_steps: 5
  batch_size: 8
  context_size: 6
eval: {{num_tasks: 3, steps: 2}}
"""


def write_config(path: Path, iterations: int = 4) -> Path:
    path.write_text(TINY.format(iterations=iterations))
    return path


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "env_steps_per_s"))} for r in metrics]


def test_buffers_after_the_first_iteration(tmp_path):
    cfg = load_experiment_config(write_config(tmp_path / "cfg.yaml"))
    exp = make_experiment(cfg)
    try:
        row = exp.train_iteration(0)
    finally:
        exp.close()
    collected = sorted(np.random.default_rng([3, 0, 0]).choice(6, 2, replace=False).tolist())
    # every task: 3 initial episodes of 10 steps; the collected tasks also 1 prior, 1 posterior and 2 extra episodes
    rl = [30 + (40 if i in collected else 0) for i in range(6)]
    # the context buffer of a collected task is cleared, then holds its prior and posterior episodes only
    context = [20 if i in collected else 30 for i in range(6)]
    assert exp.rl_buffers.sizes.tolist() == rl
    assert exp.context_buffers.sizes.tolist() == context
    assert row["env_steps"] == sum(rl)
    assert row["replay/bytes"] == (sum(rl) + sum(context)) * (2 + 2 + 1 + 2 + 1) * 4
    for name in ("loss/q", "loss/v", "loss/policy", "loss/kl", "return/prior", "return/posterior"):
        assert np.isfinite(row[name]), name


def test_same_seed_same_run_and_evaluation(tmp_path):
    cfg = load_experiment_config(write_config(tmp_path / "cfg.yaml", iterations=2))
    runs = []
    for _ in range(2):
        exp = make_experiment(cfg)
        try:
            metrics = untimed([exp.train_iteration(it) for it in range(2)])
            evaluation = exp.evaluate(num_tasks=3, steps=2, seed=5)
        finally:
            exp.close()
        runs.append((metrics, evaluation))
    assert runs[0] == runs[1]
    assert runs[0][1]["steps"] == [0, 1, 2] and runs[0][1]["num_tasks"] == 3


def test_kill_then_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", iterations=200)
    run, ref = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarl", "train", str(cfg), "--run-dir", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / "checkpoint.pt").exists() and len(rows(run)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    c = torch.load(run / "checkpoint.pt", weights_only=True)["iteration"]
    n = c + 3
    result = cli("train", "--resume", "--run-dir", run, "--no-progress", f"num_iterations={n}")
    assert result.returncode == 0, result.stderr
    result = cli("train", cfg, "--run-dir", ref, "--no-progress", f"num_iterations={n}")
    assert result.returncode == 0, result.stderr
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, ref))
    assert a["iteration"] == b["iteration"] == n and a["env_steps"] == b["env_steps"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for kind in ("rl", "context"):
        for field, value in a["replay"][kind].items():
            if isinstance(value, list):
                assert all(torch.equal(x, y) for x, y in zip(value, b["replay"][kind][field])), (kind, field)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, b["replay"][kind][field]), (kind, field)
    assert untimed(rows(run)) == untimed(rows(ref))


@pytest.fixture(scope="module")
def pearl_run(tmp_path_factory) -> Path:
    """A tiny PEARL run of 2 iterations on Navigation2D (buffers in the checkpoint)."""
    base = tmp_path_factory.mktemp("pearl")
    result = cli("train", write_config(base / "cfg.yaml", iterations=2), "--run-dir", base / "run", "--no-progress")
    assert result.returncode == 0, result.stderr
    return base / "run"


def test_adapt_acts_at_the_posterior_mean_of_its_episodes(pearl_run, tmp_path):
    import metarl

    meta = metarl.load(pearl_run)
    task = {"goal": [0.3, -0.2]}
    adapted = meta.adapt(task, episodes=3)
    assert len(adapted.returns) == 3 and adapted.kept_step == 2
    # the same three episodes again, their transitions as context, the posterior mean by hand
    exp = meta.experiment
    _, contexts = exp.infer([task], 3, (2, 7, 0), test=True)
    assert len(contexts[0]) == 30  # 3 episodes of 10 steps
    with torch.no_grad():
        mu_i, var_i = exp.agent.encoder.factors(contexts[0][None])
        precision = (1 / var_i.clamp(min=1e-7)).sum(1)
        z = ((mu_i / var_i.clamp(min=1e-7)).sum(1) / precision)[0]
        obs = np.array([0.1, -0.4], dtype=np.float32)
        mean, _ = exp.agent.actor.outputs(torch.cat([torch.from_numpy(obs), z]))
    np.testing.assert_allclose(adapted.act(obs), np.tanh(mean.numpy()) * 0.1, rtol=1e-5, atol=1e-7)
    adapted.save(tmp_path / "adapted")
    again = metarl.load_adapted(tmp_path / "adapted")
    np.testing.assert_array_equal(again.act(obs), adapted.act(obs))
    assert again.returns == adapted.returns
    result = cli("adapt", pearl_run, "--task", json.dumps(task), "--episodes", "2", "--keep", "best")
    assert result.returncode == 2 and "--keep best" in result.stderr
    result = cli("export", "--sb3", tmp_path / "x.zip", pearl_run)
    assert result.returncode == 2 and "PEARL" in result.stderr and not (tmp_path / "x.zip").exists()


def test_checkpoint_without_buffers_is_smaller_and_resumes_by_collecting_again(pearl_run, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", iterations=2)
    with_buffers, without = pearl_run, tmp_path / "without"
    result = cli("train", cfg, "--run-dir", without, "--no-progress", "pearl.checkpoint_buffers=false")
    assert result.returncode == 0, result.stderr
    assert "replay" not in torch.load(without / "checkpoint.pt", weights_only=True)
    assert (without / "checkpoint.pt").stat().st_size < (with_buffers / "checkpoint.pt").stat().st_size
    steps = rows(without)[-1]["env_steps"]
    result = cli("train", "--resume", "--run-dir", without, "--no-progress", "num_iterations=3")
    assert result.returncode == 0, result.stderr
    # the resumed iteration collected the initial steps of every task again: 6 x 30, plus 2 x 40
    assert rows(without)[-1]["env_steps"] == steps + 6 * 30 + 2 * 40
    result = cli("evaluate", without, "--json", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["metric"] == "return" and evaluation["steps"] == [0, 1, 2] and evaluation["num_tasks"] == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("action_scale=10", "action_scale"),
        ("meta_batch_size=7", "meta_batch_size"),
        ("pearl.train_tasks=0", "train_tasks"),
    ],
)
def test_bad_pearl_config_is_one_line_exit_2(tmp_path, override, named):
    result = cli("train", write_config(tmp_path / "cfg.yaml"), "--run-dir", tmp_path / "run", override)
    assert result.returncode == 2
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ray_workers_collect_the_same_run_and_a_lost_worker_loses_nothing(pearl_run, tmp_path):
    """PEARL's collection through 2 Ray workers: the same buffers, updates and metrics as in-process
    sampling; worker 0 is SIGKILLed after the first iteration, replaced, and its share re-sampled."""
    import os
    import signal

    cfg = load_experiment_config(write_config(tmp_path / "cfg.yaml", iterations=2), ["ray.workers=2"])
    exp = make_experiment(cfg)
    try:
        first = exp.train_iteration(0)
        sampler = exp.sampler(episodes=1)
        victim = sampler.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        second = exp.train_iteration(1)
        assert [e["worker"] for e in exp.events] == [0] and victim not in sampler.worker_pids()
        state = exp.state_dict(2)
    finally:
        exp.close()
    reference = torch.load(pearl_run / "checkpoint.pt", weights_only=True)
    assert untimed([first, second]) == [
        {k: v for k, v in r.items() if k != "iteration"} for r in untimed(rows(pearl_run))
    ]
    for k in reference["model"]:
        assert torch.equal(state["model"][k], reference["model"][k]), k
    for kind in ("rl", "context"):
        assert torch.equal(state["replay"][kind]["sizes"], reference["replay"][kind]["sizes"])
        for x, y in zip(state["replay"][kind]["observations"], reference["replay"][kind]["observations"]):
            assert torch.equal(x, y)
