"""Hardening of the run skeleton and of adapted-policy directories, as a user meets them.

1. one writer per run directory (``train.lock``, ``flock``): a second ``train``/``--resume`` is refused;
2. filesystem errors (a file in the path, read-only, full disk) are one line naming the path and cause;
3. damaged, hostile or malformed adapted-policy directories are one line; a moved run still loads them;
4. missing paths say "does not exist"; Navigation2D checkpoints every 10 iterations; a Ray worker
   replacement is reported once; ``metarl adapt --keep best``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import SINUSOID, cli, ok, one_error_line, stray_files, train  # tests/ is on sys.path under pytest

import metarl
from metarl.runs.rundir import RunError, RunWriteError, check_writable, load_checkpoint, lock_run_dir, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
NAV = REPO_ROOT / "experiments" / "navigation2d" / "maml_trpo.yaml"
SIN2 = ["num_iterations=2", "meta_batch_size=2", "threads=1", "eval.every=0", "checkpoint_every=1"]
NAV_TINY = [
    "num_iterations=2",
    "meta_batch_size=2",
    "episodes_per_task=2",
    "horizon=20",
    "policy.hidden=[8]",
    "threads=1",
]
TASK = '{"goal": [0.3, -0.2]}'


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def error_during_run(rc: int, err: str, *needles: str) -> str:
    """An error after training started: the progress lines, then one error line, no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("metarl: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return one_error_line(rc, errors[0] + "\n", *needles)


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def sin_run(tmp_path_factory) -> Path:
    """A finished 2-iteration sinusoid run (checkpoint at 1 and 2)."""
    run = tmp_path_factory.mktemp("sin") / "run"
    ok(train(run, *SIN2))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def nav_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("nav") / "run"
    ok(cli("train", NAV, "--run-dir", run, "--no-progress", *NAV_TINY))
    return run


@pytest.fixture(scope="module")
def adapted_dir(nav_run) -> Path:
    out = nav_run / "adapted" / "a"
    ok(cli("adapt", nav_run, "--task", TASK, "--episodes", "2", "--steps", "1", "--out", out))
    return out


# ------------------------------------------------------------------------------------------
# 1. one writer per run directory
# ------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_run_is_locked(tmp_path):
    run = tmp_path / "run"
    ok(train(run, *SIN2))
    before, inode = files(run), (run / "metrics.jsonl").stat().st_ino
    with lock_run_dir(run):
        assert (run / "train.lock").read_text().split()[0] == str(os.getpid())
        rc, out, err = cli("train", "--resume", "--run-dir", run, "--no-progress", "num_iterations=4")
        one_error_line(rc, err, str(run), f"pid {os.getpid()}", "in use")
        assert out == "" and (run / "metrics.jsonl").stat().st_ino == inode
    assert files(run) == {**before, "train.lock": b""}  # a free lock names no holder; nothing else changed
    # the lock is free once its holder is done: the resume now runs, and leaves it free again
    _, _, err = ok(cli("train", "--resume", "--run-dir", run, "--no-progress", "num_iterations=4"))
    assert "from iteration 2" in err and [r["iteration"] for r in read_metrics(run)] == [0, 1, 2, 3]
    with lock_run_dir(run):
        pass


def test_two_new_runs_in_one_directory(tmp_path):
    """The second of two fresh `train --run-dir D` started together finds D locked and writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    with lock_run_dir(run):
        rc, _, err = train(run, *SIN2)
        one_error_line(rc, err, str(run), f"pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]


def test_a_running_train_refuses_a_resume_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "metarl",
        "train",
        str(SINUSOID),
        "--run-dir",
        str(run),
        "--no-progress",
        "num_iterations=100000",
        "meta_batch_size=2",
        "threads=1",
        "eval.every=0",
        "checkpoint_every=1",
    ]
    writer = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3):
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        inode, rows = (run / "metrics.jsonl").stat().st_ino, read_metrics(run)
        second = subprocess.run(
            [sys.executable, "-m", "metarl", "train", "--resume", "--run-dir", str(run), "--no-progress"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        one_error_line(second.returncode, second.stderr, str(run), f"pid {writer.pid}")
        # metrics.jsonl was not rewritten: same file, its rows only grew
        assert (run / "metrics.jsonl").stat().st_ino == inode and read_metrics(run)[: len(rows)] == rows
        assert writer.poll() is None
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    with lock_run_dir(run):  # the kernel released the killed writer's lock: nothing stale
        pass
    done = load_checkpoint(run / "checkpoint.pt")["iteration"]
    _, _, err = ok(cli("train", "--resume", "--run-dir", run, "--no-progress", f"num_iterations={done + 1}"))
    assert f"from iteration {done}" in err and len(read_metrics(run)) == done + 1


# ------------------------------------------------------------------------------------------
# 2. filesystem errors: one line naming the path and the cause
# ------------------------------------------------------------------------------------------


def test_a_file_in_the_run_path_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "somefile").write_text("x")
    import metarl.app.commands as commands

    monkeypatch.setattr(commands, "make_experiment", lambda cfg: pytest.fail("built the experiment before checking"))
    rc, _, err = train(tmp_path / "somefile" / "run", *SIN2)
    one_error_line(rc, err, str(tmp_path / "somefile"), "not a directory")


def test_read_only_parent_is_refused_before_training(tmp_path, monkeypatch):
    """What os.access and statvfs report on a read-only mount (root ignores permission bits, so
    the test cannot make a real one)."""
    import metarl.app.commands as commands

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw)
    )
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((0,) * 8 + (os.ST_RDONLY, 255)))
    monkeypatch.setattr(commands, "make_experiment", lambda cfg: pytest.fail("built the experiment before checking"))
    rc, _, err = train(tmp_path / "run", *SIN2)
    one_error_line(rc, err, str(tmp_path / "run"), "read-only file system")
    assert not (tmp_path / "run").exists()


def read_only(monkeypatch, directory: Path) -> None:
    """Opening a file for writing under ``directory`` fails with EROFS (os.open: the lock file and
    every atomic write's temp file go through it)."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if Path(path).parent == directory and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_read_only_run_directory(sin_run, tmp_path, monkeypatch):
    run = copy_run(sin_run, tmp_path / "run")
    before = files(run)
    read_only(monkeypatch, run)
    rc, _, err = cli("train", "--resume", "--run-dir", run, "--no-progress", "num_iterations=4")
    one_error_line(rc, err, str(run / "train.lock"), "read-only file system")
    rc, _, err = cli("evaluate", run, "--num-tasks", 2)
    one_error_line(rc, err, str(run / "eval.json"), "read-only file system")
    assert files(run) == before and stray_files(run) == []


def test_evaluate_and_plot_outputs_in_the_way(sin_run, tmp_path, monkeypatch):
    import metarl.app.commands as commands

    (tmp_path / "somefile").write_text("x")
    monkeypatch.setattr(commands, "restore", lambda *a: pytest.fail("evaluated before checking the output"))
    rc, _, err = cli("evaluate", sin_run, "--json", tmp_path)
    one_error_line(rc, err, str(tmp_path), "is a directory")
    rc, _, err = cli("evaluate", sin_run, "--json", tmp_path / "somefile" / "eval.json")
    one_error_line(rc, err, str(tmp_path / "somefile"), "not a directory")
    rc, _, err = cli("plot", sin_run, "--out", tmp_path / "somefile" / "curves.png")
    one_error_line(rc, err, str(tmp_path / "somefile" / "curves.png"), "not a directory")


FULL_DISK = {
    "torch-short-write": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4046"),
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("name", sorted(FULL_DISK))
def test_full_disk_while_checkpointing(tmp_path, monkeypatch, name):
    """The disk fills up at the second checkpoint: one line, the first checkpoint and the rows
    logged before it are kept, and the run resumes once there is space."""
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise FULL_DISK[name]
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc, _, err = train(run, "num_iterations=3", "meta_batch_size=2", "threads=1", "eval.every=0", "checkpoint_every=1")
    error_during_run(rc, err, str(run / "checkpoint.pt"), "no space left on device")
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 1
    # the row of iteration 1 is written before its checkpoint; the resume drops it and writes it again
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1] and stray_files(run) == []
    _, _, err = ok(cli("train", "--resume", "--run-dir", run, "--no-progress"))
    assert "from iteration 1" in err and [r["iteration"] for r in read_metrics(run)] == [0, 1, 2]


def test_save_checkpoint_error_is_also_an_oserror(tmp_path, monkeypatch):
    from metarl.runs.rundir import save_checkpoint

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(RunWriteError) as info:
        save_checkpoint({"iteration": 1, "model": {}}, tmp_path / "c.pt")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(info.value).count("\n") == 0 and str(tmp_path / "c.pt") in str(info.value)


def test_torn_last_metrics_line_is_dropped_on_resume(sin_run, tmp_path):
    """A full disk (or a kill) mid-line leaves half a row: resume drops it instead of crashing."""
    run = copy_run(sin_run, tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2, "train/loss_pr')
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1]
    ok(cli("train", "--resume", "--run-dir", run, "--no-progress", "num_iterations=3"))
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2]


def test_export_to_an_unwritable_path(nav_run, tmp_path, monkeypatch):
    import metarl.app.export as export

    (tmp_path / "somefile").write_text("x")
    real_to_sb3 = export.to_sb3
    monkeypatch.setattr(export, "to_sb3", lambda *a, **k: pytest.fail("built the model before checking"))
    rc, _, err = cli("export", nav_run, "--sb3", tmp_path / "somefile" / "x.zip")
    one_error_line(rc, err, str(tmp_path / "somefile"), "not a directory")
    rc, _, err = cli("export", nav_run, "--sb3", tmp_path)
    one_error_line(rc, err, str(tmp_path), "is a directory")
    # the write itself fails (read-only): one line, no zip and no temp file left
    monkeypatch.setattr(export, "to_sb3", real_to_sb3)
    out = tmp_path / "ro"
    out.mkdir()
    read_only(monkeypatch, out)
    rc, _, err = cli("export", nav_run, "--sb3", out / "x.zip")
    one_error_line(rc, err, str(out / "x.zip"), "read-only file system")
    assert list(out.iterdir()) == []


def test_adapt_out_is_checked_before_adapting(nav_run, adapted_dir, tmp_path, monkeypatch):
    from metarl.app.adapt import MetaPolicy

    monkeypatch.setattr(MetaPolicy, "adapt", lambda *a, **k: pytest.fail("adapted before checking --out"))
    (tmp_path / "file").write_text("x")
    rc, _, err = cli("adapt", nav_run, "--task", TASK, "--out", tmp_path / "file")
    one_error_line(rc, err, str(tmp_path / "file"), "existing file")
    before = files(adapted_dir)
    rc, _, err = cli("adapt", nav_run, "--task", TASK, "--out", adapted_dir)
    one_error_line(rc, err, str(adapted_dir), "already holds an adapted policy")
    assert files(adapted_dir) == before
    rc, _, err = cli("adapt", nav_run, "--task", TASK, "--out", tmp_path / "file" / "sub")
    one_error_line(rc, err, str(tmp_path / "file"), "not a directory")


# ------------------------------------------------------------------------------------------
# 3. adapted-policy directories
# ------------------------------------------------------------------------------------------


class _Hostile:
    """Unpickling this creates a file: what a malicious policy.pt would do with a real payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def damage(adapted: Path, how: str, marker: Path) -> str:
    """Damage a copy of an adapted-policy directory; the file the error must name."""
    policy, info_path = adapted / "policy.pt", adapted / "adapted.json"
    info = json.loads(info_path.read_text())
    good = policy.read_bytes()
    if how == "policy-missing":
        policy.unlink()
    elif how == "policy-truncated":
        policy.write_bytes(good[: len(good) // 2])
    elif how == "policy-empty":
        policy.write_bytes(b"")
    elif how == "policy-hostile":
        policy.write_bytes(_torch_bytes({"model": _Hostile(marker)}))
    elif how == "policy-not-a-dict":
        policy.write_bytes(_torch_bytes(torch.ones(3)))
    elif how == "policy-wrong-shapes":
        state = torch.load(policy, weights_only=True)
        policy.write_bytes(
            _torch_bytes({"model": {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state["model"].items()}})
        )
    elif how == "info-not-json":
        info_path.write_text('{"run_dir": "../..", "task": ')
    elif how == "info-binary":
        info_path.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "info-not-an-object":
        info_path.write_text("[1, 2]")
    elif how.startswith("info-missing-"):
        del info[how.removeprefix("info-missing-")]
        info_path.write_text(json.dumps(info))
    elif how == "info-wrong-types":
        info_path.write_text(json.dumps({**info, "returns": "high", "episodes": 2.5}))
    elif how == "info-bad-kept-step":
        info_path.write_text(json.dumps({**info, "kept_step": 7}))
    elif how == "run-gone":
        info_path.write_text(
            json.dumps({**info, "run_dir": "../../../nowhere", "run_dir_absolute": "/nonexistent/run"})
        )
    else:
        raise AssertionError(how)
    return str(policy if how.startswith("policy") else info_path)


DAMAGES = [
    "policy-missing",
    "policy-truncated",
    "policy-empty",
    "policy-hostile",
    "policy-not-a-dict",
    "policy-wrong-shapes",
    "info-not-json",
    "info-binary",
    "info-not-an-object",
    "info-missing-run_dir",
    "info-missing-task",
    "info-missing-returns",
    "info-wrong-types",
    "info-bad-kept-step",
    "run-gone",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_adapted_policy_is_one_line(adapted_dir, tmp_path, how):
    copy = adapted_dir.parent / f"damaged-{how}"
    shutil.copytree(adapted_dir, copy)
    marker = tmp_path / "code-ran"
    try:
        needle = damage(copy, how, marker)
        zip_path = tmp_path / "x.zip"
        rc, _, err = cli("export", copy, "--sb3", zip_path)
        one_error_line(rc, err, needle if how != "run-gone" else "nowhere")
        assert not zip_path.exists()
        with pytest.raises(RunError) as info:
            metarl.load_adapted(copy)
        assert "\n" not in str(info.value)
        assert not marker.exists(), "loading policy.pt ran code from it"
        if how == "policy-hostile":  # the file really was hostile: an unsafe load runs its payload
            torch.load(copy / "policy.pt", weights_only=False)
            assert marker.exists()
    finally:
        shutil.rmtree(copy)


def test_adapted_json_stores_the_run_relative_to_it(nav_run, adapted_dir):
    info = json.loads((adapted_dir / "adapted.json").read_text())
    assert info["run_dir"] == os.path.join("..", "..")
    assert info["run_dir_absolute"] == str(nav_run.resolve()) and info["kept_step"] == 1


def test_a_moved_run_still_loads_its_adapted_policies(nav_run, adapted_dir, tmp_path):
    want = metarl.load_adapted(adapted_dir)
    run = copy_run(nav_run, tmp_path / "a" / "run")
    moved = Path(shutil.move(str(run), str(tmp_path / "b" / "elsewhere")))
    (tmp_path / "a").rmdir()
    got = metarl.load_adapted(moved / "adapted" / "a")
    assert got.run_dir == moved.resolve() and got.task == want.task and got.returns == want.returns
    assert all(torch.equal(got.params[k], want.params[k]) for k in want.params)
    ok(cli("export", moved / "adapted" / "a", "--sb3", tmp_path / "x.zip"))
    # an adapted.json written before this change (absolute run_dir, no run_dir_absolute) still loads
    info_path = moved / "adapted" / "a" / "adapted.json"
    info = json.loads(info_path.read_text())
    del info["run_dir_absolute"], info["kept_step"]
    info_path.write_text(json.dumps({**info, "run_dir": str(moved.resolve())}))
    old = metarl.load_adapted(moved / "adapted" / "a")
    assert old.kept_step == len(old.returns) - 1 and all(
        torch.equal(old.params[k], want.params[k]) for k in want.params
    )


# ------------------------------------------------------------------------------------------
# 4. smaller points
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "{p}"],
        ["adapt", "{p}", "--task", TASK],
        ["export", "{p}", "--sb3", "x.zip"],
        ["train", "--resume", "--run-dir", "{p}"],
    ],
    ids=lambda a: a[0] + ("-resume" if "--resume" in a else ""),
)
def test_a_missing_path_says_it_does_not_exist(tmp_path, argv):
    missing = tmp_path / "no" / "such-run"
    rc, _, err = cli(*[str(missing) if a == "{p}" else a for a in argv])
    one_error_line(rc, err, str(missing), "does not exist")


def test_python_api_says_does_not_exist(tmp_path):
    for load in (metarl.load, metarl.load_adapted):
        with pytest.raises(RunError, match="does not exist"):
            load(tmp_path / "missing")


def test_navigation2d_configs_checkpoint_within_the_quickstart():
    from metarl.runs.load import load_experiment_config as _load

    readme = (REPO_ROOT / "README.md").read_text()
    assert "navigation2d/maml_trpo.yaml num_iterations=30" in readme  # the quickstart
    for path in sorted((REPO_ROOT / "experiments" / "navigation2d").glob("*.yaml")):
        assert _load(path, []).checkpoint_every == 10, path.name


def test_a_worker_replacement_is_reported_once(monkeypatch, capsys, caplog):
    """RaySampler reports a replaced worker through on_event when given (metarl train prints it
    and counts it), and logs a warning only when nobody else reports it."""
    import ray

    from metarl.rl.sampling.ray_sampler import RaySampler
    from metarl.runs.rl import RLExperiment

    class Remote:
        @staticmethod
        def remote(*args):
            return object()

    monkeypatch.setattr(ray, "kill", lambda *a, **k: None)
    sampler = object.__new__(RaySampler)  # no Ray cluster: only the reporting is under test
    sampler._remote_cls, sampler._args, sampler.events, sampler.workers = Remote, (), [], [object(), object()]

    class Experiment:
        events: list = []

    exp = Experiment()
    sampler.on_event = lambda event: RLExperiment._on_event(exp, event)
    with caplog.at_level("WARNING"):
        sampler._replace(1, RuntimeError("actor died\nmore"), (4, 8))
    err = capsys.readouterr().err
    assert err.count("worker 1") == 1 and "tasks 4..7" in err and len(exp.events) == len(sampler.events) == 1
    assert [r for r in caplog.records if "worker" in r.getMessage()] == []
    sampler.on_event = None  # nobody else reports it: the sampler logs it once
    with caplog.at_level("WARNING"):
        sampler._replace(0, RuntimeError("gone"), (0, 4))
    assert len([r for r in caplog.records if "worker 0" in r.getMessage()]) == 1 and len(sampler.events) == 2


def test_keep_best_keeps_the_step_with_the_highest_return(nav_run, monkeypatch):
    """Known returns (patched): best is step 1 of 0..3, or step 0 (the meta-policy itself)."""
    import metarl.app.adapt as adapt

    meta = metarl.load(nav_run)
    task = {"goal": [0.3, -0.2]}
    reference = {s: meta.adapt(task, episodes=2, steps=s, seed=3).params for s in (1, 3)}
    for returns, best in (([1.0, 5.0, 2.0, 3.0], 1), ([9.0, 1.0, 2.0, 3.0], 0), ([1.0, 2.0, 5.0, 5.0], 2)):
        values = iter(returns)
        monkeypatch.setattr(adapt, "_mean_return", lambda data, values=values: next(values))
        got = meta.adapt(task, episodes=2, steps=3, seed=3, keep="best")
        monkeypatch.undo()
        assert got.returns == returns and got.kept_step == best  # the first of equal returns on ties
        want = (
            meta.params
            if best == 0
            else reference[best]
            if best in reference
            else meta.adapt(task, episodes=2, steps=best, seed=3).params
        )
        for k in want:
            assert torch.equal(got.params[k], want[k]), (best, k)
    last = meta.adapt(task, episodes=2, steps=3, seed=3)
    assert last.kept_step == 3 and all(torch.equal(last.params[k], reference[3][k]) for k in last.params)
    with pytest.raises(ValueError, match="keep"):
        meta.adapt(task, episodes=2, steps=1, keep="first")


def test_cli_adapt_keep_best(nav_run, tmp_path):
    out = tmp_path / "best"
    _, stdout, _ = ok(
        cli("adapt", nav_run, "--task", TASK, "--episodes", "2", "--steps", "3", "--keep", "best", "--out", out)
    )
    info = json.loads((out / "adapted.json").read_text())
    returns = info["returns"]
    best = max(range(len(returns)), key=lambda s: returns[s])
    assert info["kept_step"] == best and f"kept the policy of step {best} (--keep best" in stdout
    again = metarl.load(nav_run).adapt({"goal": [0.3, -0.2]}, episodes=2, steps=best, seed=0)
    loaded = metarl.load_adapted(out)
    assert loaded.kept_step == best
    assert all(torch.equal(loaded.params[k], again.params[k]) for k in again.params)
    _, stdout, _ = ok(cli("adapt", nav_run, "--task", TASK, "--episodes", "2", "--steps", "2", "--out", tmp_path / "l"))
    assert "kept the policy of step 2 (--keep last" in stdout
    rc, help_text, _ = cli("adapt", "--help")
    assert rc == 0 and "--keep {last,best}" in help_text and "highest" in help_text


def test_check_writable_accepts_what_can_be_created(tmp_path):
    check_writable(tmp_path / "a" / "b" / "c")
    check_writable(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunWriteError, match="is a file"):
        check_writable(tmp_path / "f" / "g")
