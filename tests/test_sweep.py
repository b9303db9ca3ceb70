"""`metarl sweep`: seeds x settings as Ray Tune trials, each a run directory; faults and --resume."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarl.app.sweep import parse_grid, parse_seeds, plan_trials, trial_resources
from metarl.core.config import ConfigError
from metarl.runs.load import load_experiment_config
from metarl.runs.rundir import CHECKPOINT, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAV = ROOT / "experiments/navigation2d/maml_trpo.yaml"
#: Iterations of a fifth of a second or so, a checkpoint every third.
SMALL = [
    "num_iterations=30",
    "checkpoint_every=3",
    "meta_batch_size=3",
    "episodes_per_task=4",
    "horizon=40",
    "policy.hidden=[8]",
    "threads=1",
]
#: Keys that measure time, not learning.
TIMING = ("time/", "env_steps_per_s")


def test_seeds_and_grids_are_parsed_and_bad_ones_are_refused():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5") == [5] and parse_seeds("0,3,7") == [0, 3, 7] and parse_seeds("0-1,4") == [0, 1, 4]
    for bad in ("a", "3-1", "0,0", "-1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert parse_grid(["inner.lr=0.05,0.1", "policy.hidden=[8],[16,16]"]) == [
        ("inner.lr", ["0.05", "0.1"]),
        ("policy.hidden", ["[8]", "[16,16]"]),
    ]
    for bad in ("inner.lr", "=1,2", "inner.lr=", "inner.lr=1,,2"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid([bad])


def test_trials_cross_configs_grid_and_seeds():
    fomaml = ROOT / "experiments/navigation2d/fomaml.yaml"
    trials = plan_trials([NAV, fomaml], parse_grid(["inner.lr=0.05,0.1"]), [0, 1], ["num_iterations=7"])
    assert [t["name"] for t in trials] == [
        f"{stem},inner.lr={lr}-seed{s}" for stem in ("maml_trpo", "fomaml") for lr in ("0.05", "0.1") for s in (0, 1)
    ]
    last = trials[-1]["cfg"]
    assert (last.algorithm, last.inner.lr, last.seed, last.num_iterations) == ("fomaml", 0.1, 1, 7)
    with pytest.raises(ConfigError, match=r"sweep setting inner.lr=-1 \(seed 0\)"):
        plan_trials([NAV], parse_grid(["inner.lr=-1"]), [0], [])
    # the learner's threads (at least one CPU) and one bundle per rollout worker
    cfg = load_experiment_config(NAV, ["threads=2", "ray.workers=3", "sampler.physics_threads=2"])
    assert trial_resources(cfg, 0.5) == [{"CPU": 2.0, "GPU": 0.5}] + [{"CPU": 2.0}] * 3
    assert trial_resources(load_experiment_config(NAV, ["threads=0"]), 0) == [{"CPU": 1.0}]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "metarl", *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_bad_sweep_input_is_one_line_and_exit_2(tmp_path):
    result = _cli("sweep", str(NAV), "--seeds", "x", "--out", str(tmp_path / "s"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "metarl: error: --seeds 'x': give a range 0-9, a list 0,3,7 or one seed"
    ]
    result = _cli("sweep", str(NAV), "--max-failures", "-1", "--out", str(tmp_path / "s"), timeout=120)
    assert result.returncode == 2 and "--max-failures must be >= 0, got -1" in result.stderr
    result = _cli("sweep", str(NAV), "--grid", "inner.lr=0.1,-2", "--out", str(tmp_path / "s"), timeout=120)
    assert result.returncode == 2 and "sweep setting inner.lr=-2 (seed 0)" in result.stderr
    result = _cli(
        "sweep", str(NAV), "--cpus", "2", "threads=1", "ray.workers=2", "--out", str(tmp_path / "s"), timeout=120
    )
    assert result.returncode == 2 and "a trial needs 3 CPUs" in result.stderr and "has 2 (--cpus)" in result.stderr
    result = _cli("sweep", "--resume", "nope", "--out", str(tmp_path / "none"), timeout=120)
    assert result.returncode == 2 and "holds no sweep.json" in result.stderr
    assert not (tmp_path / "s").exists()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _count(run_dir: Path) -> int:
    return len(_rows(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0


def _checkpointed(run_dir: Path) -> int:
    """Iterations the run's checkpoint holds (a run is finished only once its last one is checkpointed:
    its last row is written just before)."""
    path = run_dir / CHECKPOINT
    return int(load_checkpoint(path)["iteration"]) if path.exists() else 0


def _learning(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def _lock_holder(run_dir: Path) -> int | None:
    text = (run_dir / "train.lock").read_text().split() if (run_dir / "train.lock").exists() else []
    return int(text[0]) if text else None


def _lock_is_free(run_dir: Path) -> bool:
    """No process holds the run's lock (the kernel frees it when its holder ends, however it ends)."""
    with open(run_dir / "train.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def _wait(condition, what: str, timeout: float = 300, driver: subprocess.Popen | None = None, log=None) -> None:
    """Poll ``condition``; fail after ``timeout`` s, or at once if ``driver`` ended (with its log's end)."""
    deadline = time.time() + timeout
    while not condition():
        ended = driver is not None and driver.poll() is not None
        if ended or time.time() > deadline:
            tail = "\n".join(Path(log).read_text().splitlines()[-30:]) if log else ""
            why = f"the driver ended (exit {driver.returncode})" if ended else "timed out"
            raise AssertionError(f"{why} waiting for {what}; the driver's log ends:\n{tail}")
        time.sleep(0.02)


def test_sweep_survives_a_killed_trial_and_a_killed_driver(tmp_path):
    """4 trials (2 settings x 2 seeds) on a local Ray of 2 CPUs, so two at a time. A trial's process is
    SIGKILLed mid-run: Tune restarts it, it continues from its checkpoint and ends with the metrics
    of an uninterrupted run. Then the driver and its running trials are SIGKILLed once a trial has
    finished and another is mid-run; `--resume` finishes the others without touching the finished."""
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "metarl", "sweep", str(NAV), "--seeds", "0-1", "--grid", "inner.lr=0.05,0.1"]
    command += ["--name", "t", "--out", str(out), "--cpus", "2", *SMALL]
    env = {**os.environ, "METARL_SWEEP_PROGRESS_S": "0"}
    driver_log = tmp_path / "driver.log"
    log = open(driver_log, "w")  # noqa: SIM115 (closed below, once the driver is gone)
    driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait(lambda: (out / "sweep.json").exists(), "sweep.json", driver=driver, log=driver_log)
        trials = {t["name"]: Path(t["run_dir"]) for t in json.loads((out / "sweep.json").read_text())["trials"]}
        assert sorted(trials) == [
            "inner.lr=0.05-seed0",
            "inner.lr=0.05-seed1",
            "inner.lr=0.1-seed0",
            "inner.lr=0.1-seed1",
        ]
        first = trials["inner.lr=0.05-seed0"]
        _wait(lambda: _count(first) >= 5, "5 iterations of the first trial", driver=driver, log=driver_log)
        os.kill(_lock_holder(first), signal.SIGKILL)
        # kill the driver once Tune has restarted that trial, a trial has finished and another is mid-run
        restarted = "trial inner.lr=0.05-seed0: failed; restarting it from its last checkpoint (failure 1 of at most 3)"

        def counts() -> list[int]:
            return [_count(d) for d in trials.values()]

        def checkpointed() -> list[int]:
            return [_checkpointed(d) for d in trials.values()]

        _wait(
            lambda: (
                restarted in driver_log.read_text() and 30 in checkpointed() and any(1 <= n <= 20 for n in counts())
            ),
            "a finished trial and one mid-run",
            driver=driver,
            log=driver_log,
        )
        at_kill = {n: _count(d) for n, d in trials.items()}
        # the whole machine goes down: the driver, and at once the trials it ran (Ray would end them
        # a few seconds later, time enough for a fast trial to finish)
        os.killpg(driver.pid, signal.SIGKILL)
        for run_dir in trials.values():
            if (run_dir / "train.lock").exists() and not _lock_is_free(run_dir):
                with contextlib.suppress(ProcessLookupError, ValueError, TypeError):
                    os.kill(_lock_holder(run_dir), signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    for run_dir in trials.values():  # every process of the sweep is gone (a run's lock is freed by its end)
        _wait(lambda run_dir=run_dir: _lock_is_free(run_dir), f"{run_dir.name}'s processes to end", 60)
    finished = {n: (d / "metrics.jsonl").read_bytes() for n, d in trials.items() if _checkpointed(d) == 30}
    assert finished
    assert len(finished) < 4, f"every trial had finished after the driver was killed ({at_kill})"
    stamps = {n: (trials[n] / "metrics.jsonl").stat().st_mtime_ns for n in finished}

    result = _cli("sweep", "--resume", "t", "--out", str(out), "--cpus", "2", env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming sweep t" in result.stderr and "4 of 4 trials done" in result.stdout
    for name, run_dir in trials.items():
        rows = _rows(run_dir)
        assert [r["iteration"] for r in rows] == list(range(30)), name
        if name in finished:  # kept as they were: not run again
            assert (run_dir / "metrics.jsonl").read_bytes() == finished[name], name
            assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamps[name], name

    # the trial killed mid-run ends exactly as an uninterrupted run of its config
    reference = tmp_path / "reference"
    result = _cli("train", str(first / "config.yaml"), "--run-dir", str(reference), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    assert _learning(_rows(first)) == _learning(_rows(reference))
    # and the seeds differ: a trial is not a copy of another
    assert _learning(_rows(first)) != _learning(_rows(trials["inner.lr=0.05-seed1"]))


def test_a_sweep_stopped_by_ctrl_c_says_what_is_left_and_how_to_resume(tmp_path):
    """SIGINT to the driver (Ctrl-C): Tune stops, and the summary lists every trial (the running one
    stopped, the other not started) with the --resume command; exit 1, no traceback."""
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "metarl", "sweep", str(NAV), "--seeds", "0-1", "--name", "c", "--out", str(out)]
    command += ["--cpus", "1", *SMALL]
    env = {**os.environ, "METARL_SWEEP_PROGRESS_S": "0"}
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait(lambda: _count(out / "maml_trpo-seed0") >= 3, "3 iterations", driver=driver, log=driver_log)
            driver.send_signal(signal.SIGINT)
            assert driver.wait(timeout=120) == 1
        finally:
            if driver.poll() is None:
                driver.kill()
    text = driver_log.read_text()
    # the driver's own output has no traceback (a stopped trial's worker may log Ray's teardown)
    assert not any(line.startswith("Traceback") for line in text.splitlines()), text
    states = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("maml_trpo-seed")}
    assert states == {"maml_trpo-seed0": "stopped", "maml_trpo-seed1": "pending"}, text
    assert f"metarl sweep --resume c --out {out}" in text and "0 of 2 trials done" in text


def test_a_path_holding_an_equals_sign_is_not_an_override():
    from metarl.core.config_files import is_override

    assert is_override("inner.lr=0.1") and is_override("policy.hidden=[8,8]") and is_override("_x=1")
    assert not is_override("runs/sweeps/s/inner.lr=0.1-seed0/config.yaml")
    assert not is_override("/tmp/inner.lr=0.1-seed0/config.yaml") and not is_override("config.yaml")
