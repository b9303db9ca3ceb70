"""End-to-end tests of the ``metarl`` command: train, evaluate, errors, resume, atomic checkpoints.

Budgets are tiny (sinusoid: ~20 iterations, meta-batch 5; Omniglot: 8 filters, meta-batch 2)
and everything but the kill test runs in-process through :func:`metarl.app.cli.main`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarl.app.cli import main
from metarl.core.config_files import load_config
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rundir import load_checkpoint, read_metrics, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
SINUSOID = REPO_ROOT / "experiments" / "sinusoid" / "maml.yaml"
OMNIGLOT = REPO_ROOT / "experiments" / "omniglot" / "maml_5w1s.yaml"
OMNIGLOT_DATA = (REPO_ROOT.parent / "shared" / "data" / "omniglot").resolve()

needs_omniglot = pytest.mark.skipif(not OMNIGLOT_DATA.is_dir(), reason=f"no Omniglot data at {OMNIGLOT_DATA}")

# Small sinusoid budget: validation at iterations 6, 13 and 19 (the last), checkpoints at 8, 16, 20.
SIN = [
    "num_iterations=20",
    "meta_batch_size=5",
    "threads=1",
    "checkpoint_every=8",
    "eval.every=7",
    "eval.val_tasks=10",
    "eval.steps=2",
    "eval.num_tasks=8",
    "eval.chunk=8",
]
OMNI = [
    f"omniglot.root={OMNIGLOT_DATA}",
    "omniglot.filters=8",
    "meta_batch_size=2",
    "threads=1",
    "num_iterations=3",
    "eval.every=0",
    "eval.num_tasks=6",
    "eval.steps=2",
    "checkpoint_every=100",
]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs set torch's thread count (``threads=``); give other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cli(*argv) -> tuple[int, str, str]:
    """Run ``metarl ARGV`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def train(run_dir: Path, *overrides: str, config: Path = SINUSOID) -> tuple[int, str, str]:
    return cli("train", "--run-dir", run_dir, "--no-progress", config, *overrides)


def ok(result: tuple[int, str, str]) -> tuple[int, str, str]:
    rc, out, err = result
    assert rc == 0, f"exit {rc}\nstdout: {out}\nstderr: {err}"
    return result


def stray_files(run_dir: Path) -> list[str]:
    """Temp files left beside the run's files (atomic writes must clean theirs up)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Bit-identical nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def one_error_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines}"
    assert lines[0].startswith("metarl: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def sin_run(tmp_path_factory) -> tuple[Path, str, str]:
    """One small sinusoid run shared by the read-only tests: (run dir, stdout, stderr)."""
    run = tmp_path_factory.mktemp("sin") / "run"
    _, out, err = ok(train(run, *SIN))
    return run, out, err


@pytest.fixture(scope="module")
def omni_run(tmp_path_factory) -> Path:
    if not OMNIGLOT_DATA.is_dir():
        pytest.skip(f"no Omniglot data at {OMNIGLOT_DATA}")
    run = tmp_path_factory.mktemp("omni") / "run"
    ok(train(run, *OMNI, config=OMNIGLOT))
    return run


# ------------------------------------------------------------------------------------------
# 1. train writes a complete run directory
# ------------------------------------------------------------------------------------------


def test_train_writes_resolved_config(sin_run):
    run, out, _ = sin_run
    saved = load_config(FewShotConfig, run / "config.yaml")
    expected = load_config(FewShotConfig, SINUSOID, SIN)
    # the data directory is stored absolute, so the run directory works from any cwd
    expected.omniglot.root = str(Path(expected.omniglot.root).resolve())
    assert Path(saved.omniglot.root).is_absolute()
    assert saved == expected
    text = (run / "config.yaml").read_text()
    for key in ("device:", "threads:", "omniglot:", "filters:", "epsilon_start:", "x_range:"):  # defaults filled in
        assert key in text
    assert saved.num_iterations == 20 and saved.eval.every == 7 and saved.seed == 1
    assert "done: 20 iterations" in out and f"metarl evaluate {run}" in out


def test_train_writes_checkpoint(sin_run):
    run, _, _ = sin_run
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 20
    assert state["model"] and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 20
    assert stray_files(run) == []


def test_train_writes_metrics_jsonl(sin_run):
    run, _, _ = sin_run
    rows = read_metrics(run)
    assert len(rows) == 20
    assert [r["iteration"] for r in rows] == list(range(20))
    base = {
        "iteration",
        "time/iteration",
        "time/sampling",
        "time/meta_update",
        "train/loss_pre_adapt",
        "train/loss_post_adapt",
    }
    val = {"val/mse_pre_adapt", "val/mse_post_adapt"}
    for r in rows:
        assert base <= set(r), sorted(r)
        if r["iteration"] in (6, 13, 19):
            assert val <= set(r), (r["iteration"], sorted(r))
        else:
            assert not val & set(r), (r["iteration"], sorted(r))
        assert all(isinstance(v, (int, float)) for v in r.values())
        assert r["time/iteration"] >= r["time/meta_update"] >= 0


def test_train_writes_tensorboard_with_the_metrics_keys(sin_run):
    run, _, _ = sin_run
    assert list(run.glob("events.out.tfevents.*"))
    rows = read_metrics(run)
    keys = set().union(*rows) - {"iteration"}
    scalars = tb_scalars(run)
    assert set(scalars) == keys
    for key in keys:
        expected = [(r["iteration"], r[key]) for r in rows if key in r]
        got = scalars[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-9), key


def test_train_accepts_overrides_after_options(tmp_path):
    """The documented form ``metarl train CONFIG [--run-dir DIR] [--no-progress] [key=value ...]``."""
    run = tmp_path / "run"
    rc, out, err = cli(
        "train",
        SINUSOID,
        "--run-dir",
        run,
        "--no-progress",
        "num_iterations=2",
        "meta_batch_size=2",
        "eval.every=0",
        "threads=1",
    )
    assert rc == 0, f"exit {rc}: {err!r}"
    assert load_config(FewShotConfig, run / "config.yaml").num_iterations == 2


# ------------------------------------------------------------------------------------------
# 2. evaluate
# ------------------------------------------------------------------------------------------


def check_eval(result: dict, metric: str, steps: int, num_tasks: int, iteration: int) -> None:
    assert set(result) == {"metric", "steps", "mean", "ci95", "num_tasks", "iteration"}
    assert result["metric"] == metric
    assert result["steps"] == list(range(steps + 1))
    assert len(result["mean"]) == len(result["ci95"]) == steps + 1
    assert all(isinstance(x, float) for x in result["mean"] + result["ci95"])
    assert all(c >= 0 for c in result["ci95"])
    assert result["num_tasks"] == num_tasks
    assert result["iteration"] == iteration


def test_evaluate_sinusoid(sin_run, tmp_path):
    run, _, _ = sin_run
    out_json = tmp_path / "sub" / "eval.json"
    _, out, _ = ok(cli("evaluate", run, "--json", out_json, "--num-tasks", 7, "--steps", 3, "--seed", 5))
    result = json.loads(out_json.read_text())
    assert json.loads((run / "eval.json").read_text()) == result
    check_eval(result, "mse", steps=3, num_tasks=7, iteration=20)
    assert all(m > 0 for m in result["mean"])
    assert "mse" in out
    # same seed -> identical; another seed -> other tasks
    ok(cli("evaluate", run, "--json", tmp_path / "again.json", "--num-tasks", 7, "--steps", 3, "--seed", 5))
    assert json.loads((tmp_path / "again.json").read_text()) == result
    ok(cli("evaluate", run, "--json", tmp_path / "other.json", "--num-tasks", 7, "--steps", 3, "--seed", 6))
    assert json.loads((tmp_path / "other.json").read_text())["mean"] != result["mean"]
    # defaults come from the run's eval section (steps=2, num_tasks=8)
    ok(cli("evaluate", run))
    check_eval(json.loads((run / "eval.json").read_text()), "mse", steps=2, num_tasks=8, iteration=20)


@needs_omniglot
def test_evaluate_omniglot(omni_run, tmp_path):
    run = omni_run
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2]
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 3
    ok(cli("evaluate", run, "--json", tmp_path / "a.json", "--num-tasks", 6, "--steps", 2, "--seed", 3))
    result = json.loads((tmp_path / "a.json").read_text())
    assert json.loads((run / "eval.json").read_text()) == result
    check_eval(result, "accuracy", steps=2, num_tasks=6, iteration=3)
    assert all(0.0 <= m <= 1.0 for m in result["mean"])
    ok(cli("evaluate", run, "--json", tmp_path / "b.json", "--num-tasks", 6, "--steps", 2, "--seed", 3))
    assert json.loads((tmp_path / "b.json").read_text()) == result


@pytest.mark.parametrize(
    "flags, needle",
    [(["--num-tasks", "0"], "tasks"), (["--steps", "-1"], "steps")],
    ids=["num-tasks-0", "steps-negative"],
)
def test_evaluate_rejects_bad_flags(sin_run, flags, needle):
    run, _, _ = sin_run
    rc, _, err = cli("evaluate", run, *flags)
    one_error_line(rc, err, needle)


# ------------------------------------------------------------------------------------------
# 3. user mistakes: one line on stderr, exit 2, nothing written
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, overrides, needles",
    [
        (SINUSOID, ["inner.lrr=0.1"], ["inner.lrr"]),
        (SINUSOID, ["inner.steps=abc"], ["inner.steps", "int"]),
        (SINUSOID, ["meta_batch_size=0"], ["meta_batch_size", ">= 1"]),
        (SINUSOID, ["device=gpu"], ["device", "'cuda'"]),
        (REPO_ROOT / "experiments" / "no-such.yaml", [], ["no-such.yaml", "not found"]),
        (OMNIGLOT, ["omniglot.root=/nonexistent"], ["/nonexistent", "brendenlake/omniglot"]),
    ],
    ids=["unknown-key", "wrong-type", "bad-value", "bad-literal", "missing-config", "missing-omniglot"],
)
def test_train_config_errors(tmp_path, config, overrides, needles):
    run = tmp_path / "run"
    rc, out, err = train(run, *overrides, config=config)
    one_error_line(rc, err, *needles)
    assert not run.exists()


def test_train_cuda_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    rc, _, err = train(run, "device=cuda", "num_iterations=1")
    one_error_line(rc, err, "device", "cuda")
    assert not run.exists()


def test_train_refuses_existing_run(sin_run):
    run, _, _ = sin_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc, _, err = train(run, *SIN)
    one_error_line(rc, err, str(run), "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_evaluate_non_run_dir(tmp_path):
    rc, _, err = cli("evaluate", tmp_path)
    one_error_line(rc, err, str(tmp_path), "config.yaml")
    rc, _, err = cli("evaluate", tmp_path / "missing")
    one_error_line(rc, err, str(tmp_path / "missing"))


DAMAGES = ["garbage", "truncated", "empty", "not-a-dict", "wrong-shapes"]


def damaged_run(sin_run, tmp_path, damage: str) -> Path:
    """A copy of the shared run whose checkpoint.pt is damaged in the way named."""
    src = sin_run[0]
    run = tmp_path / f"damaged-{damage}"
    run.mkdir()
    (run / "config.yaml").write_bytes((src / "config.yaml").read_bytes())
    good = (src / "checkpoint.pt").read_bytes()
    if damage == "garbage":
        data = b"\x00garbage, not a torch file\xff" * 20
    elif damage == "truncated":
        data = good[: len(good) // 2]
    elif damage == "empty":
        data = b""
    else:
        if damage == "not-a-dict":
            obj = torch.ones(3)
        else:  # a whole metarl checkpoint of another model (every layer one unit wider)
            obj = torch.load(src / "checkpoint.pt", weights_only=True)
            obj["model"] = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in obj["model"].items()}
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
    (run / "checkpoint.pt").write_bytes(data)
    return run


@pytest.mark.parametrize("damage", DAMAGES)
def test_evaluate_damaged_checkpoint(sin_run, tmp_path, damage):
    run = damaged_run(sin_run, tmp_path, damage)
    rc, _, err = cli("evaluate", run, "--num-tasks", 2)
    one_error_line(rc, err, str(run / "checkpoint.pt"))
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_damaged_checkpoint(sin_run, tmp_path, damage):
    run = damaged_run(sin_run, tmp_path, damage)
    rc, _, err = cli("train", "--resume", "--run-dir", run, "--no-progress")
    one_error_line(rc, err, str(run / "checkpoint.pt"))


def test_errors_in_a_real_process(sin_run, tmp_path):
    """Errors from a real process: one line on stderr, no traceback, no warnings."""
    run = damaged_run(sin_run, tmp_path, "truncated")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for argv, needle in (
        [["evaluate", str(run)], "checkpoint.pt"],
        [["train", str(SINUSOID), "device=cuda", "--run-dir", str(tmp_path / "x")], "cuda"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "metarl", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        one_error_line(proc.returncode, proc.stderr, needle)
        assert proc.stdout == ""
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------
# 4. resume = uninterrupted
# ------------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted(tmp_path):
    common = [
        "meta_batch_size=5",
        "threads=1",
        "checkpoint_every=4",
        "eval.every=4",
        "eval.val_tasks=10",
        "eval.steps=2",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(train(a, "num_iterations=12", *common))
    ok(train(b, "num_iterations=8", *common))
    assert load_checkpoint(b / "checkpoint.pt")["iteration"] == 8
    _, _, err = ok(cli("train", "--resume", "--run-dir", b, "--no-progress", "num_iterations=12"))
    assert "from iteration 8" in err
    sa, sb = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (a, b))
    assert sa["iteration"] == sb["iteration"] == 12
    assert_same_state(sa["model"], sb["model"], "model")
    assert_same_state(sa.get("learner"), sb.get("learner"), "learner")
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["iteration"] for r in rb] == list(range(12))
    assert untimed(ra) == untimed(rb)
    assert load_config(FewShotConfig, b / "config.yaml") == load_config(FewShotConfig, a / "config.yaml")
    ta, tb = tb_scalars(a), tb_scalars(b)
    assert set(ta) == set(tb)
    for tag in ta:
        if not tag.startswith("time/"):
            assert ta[tag] == tb[tag], tag
    assert stray_files(a) == stray_files(b) == []
    # resuming a finished run does nothing
    before = (b / "checkpoint.pt").read_bytes()
    _, _, err = ok(cli("train", "--resume", "--run-dir", b, "--no-progress"))
    assert "nothing to do" in err and (b / "checkpoint.pt").read_bytes() == before


KILL = ["checkpoint_every=50", "eval.every=0", "meta_batch_size=5", "threads=1"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """A real ``metarl train`` of 3000 iterations SIGKILLed past its first checkpoint, resumed
    in-process to N = checkpoint + 25 iterations, and an uninterrupted run of N iterations."""
    base = tmp_path_factory.mktemp("kill")
    run, ref = base / "killed", base / "reference"
    log = (base / "stderr.txt").open("w")
    cmd = [
        sys.executable,
        "-m",
        "metarl",
        "train",
        "--run-dir",
        str(run),
        "--no-progress",
        str(SINUSOID),
        "num_iterations=3000",
        *KILL,
    ]
    proc = subprocess.Popen(cmd, cwd=base, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"train exited early ({proc.returncode}): {(base / 'stderr.txt').read_text()}"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            metrics = run / "metrics.jsonl"
            if (run / "checkpoint.pt").exists() and metrics.exists() and metrics.read_text().count("\n") >= 60:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = read_metrics(run)
    state = load_checkpoint(run / "checkpoint.pt")  # atomic: the checkpoint at the kill is whole
    c = state["iteration"]
    n = c + 25
    _, _, resume_err = ok(cli("train", "--resume", "--run-dir", run, "--no-progress", f"num_iterations={n}"))
    ok(train(ref, f"num_iterations={n}", *KILL))
    return {"run": run, "ref": ref, "c": c, "n": n, "rows_at_kill": rows_at_kill, "resume_err": resume_err}


def test_kill_then_resume_is_bit_identical(killed):
    run, ref, c, n = killed["run"], killed["ref"], killed["c"], killed["n"]
    assert c >= 50 and c % 50 == 0
    assert len(killed["rows_at_kill"]) >= 60
    assert f"from iteration {c}" in killed["resume_err"]
    s_run, s_ref = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, ref))
    assert s_run["iteration"] == s_ref["iteration"] == n
    assert_same_state(s_run["model"], s_ref["model"], "model")
    assert_same_state(s_run.get("learner"), s_ref.get("learner"), "learner")
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == list(range(n))
    assert untimed(rows) == untimed(read_metrics(ref))
    assert stray_files(ref) == []


def test_kill_then_resume_keeps_tensorboard_complete(killed):
    """TensorBoard after kill + resume reads like the uninterrupted run: every iteration once."""
    run, ref, n = killed["run"], killed["ref"], killed["n"]
    got, want = tb_scalars(run), tb_scalars(ref)
    assert set(got) == set(want)
    steps = [s for s, _ in got["train/loss_pre_adapt"]]
    missing = sorted(set(range(n)) - set(steps))
    assert steps == list(range(n)), f"{len(missing)} iterations missing from TensorBoard, e.g. {missing[:5]}"
    for tag in want:
        if not tag.startswith("time/"):
            assert got[tag] == want[tag], tag


# ------------------------------------------------------------------------------------------
# 5. resume refuses a changed config
# ------------------------------------------------------------------------------------------


def test_resume_refuses_changed_key(sin_run):
    run, _, _ = sin_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc, _, err = cli("train", "--resume", "--run-dir", run, "--no-progress", "inner.lr=0.02")
    line = one_error_line(rc, err, "inner.lr")
    assert "num_iterations" in line  # says what may change
    rc, _, err = cli("train", "--resume", "--run-dir", run, "--no-progress", SINUSOID, *SIN, "seed=7")
    one_error_line(rc, err, "seed")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # threads may change (the run is finished, so nothing else happens)
    _, _, err = ok(cli("train", "--resume", "--run-dir", run, "--no-progress", SINUSOID, *SIN, "threads=2"))
    assert "nothing to do" in err


def test_resume_needs_a_run(tmp_path):
    rc, _, err = cli("train", "--resume", "--no-progress", SINUSOID)
    one_error_line(rc, err, "--run-dir")
    rc, _, err = cli("train", "--resume", "--run-dir", tmp_path, "--no-progress")
    one_error_line(rc, err, str(tmp_path))


# ------------------------------------------------------------------------------------------
# 6. save_checkpoint is atomic
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_save_checkpoint_is_atomic(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "model": {"w": torch.arange(1000.0)}}, path)
    old = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the bytes reach the temp file
        f.flush()
        assert stray_files(tmp_path), "the write should go to a temp file beside the checkpoint"
        raise exc

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint({"iteration": 2, "model": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == old
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # a failure on the very first save leaves nothing behind either
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint({"iteration": 1, "model": {}}, tmp_path / "first.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_experiment_config_loads_and_is_named_after_its_algorithm(path):
    from metarl.runs.load import load_experiment_config as _load

    cfg = _load(path, [])
    assert cfg.algorithm in path.stem
    if path.parent.name not in ("sinusoid", "omniglot"):
        from metarl.runs.rl_config import RLConfig

        assert isinstance(cfg, RLConfig) and path.stem == cfg.algorithm


def test_readme_config_reference_matches_the_code():
    from metarl.core.config_files import describe
    from metarl.runs.rl_config import RLConfig

    readme = (REPO_ROOT / "README.md").read_text()
    for cls in (FewShotConfig, RLConfig):
        assert describe(cls).strip() in readme, f"README's config reference is stale for {cls.__name__}"


def _train_then_sigterm(run, config, overrides, *, start_timeout):
    """Start `metarl train`, send SIGTERM once its first checkpoint exists; (exit status, stderr)."""
    cmd = [sys.executable, "-m", "metarl", "train", str(config), "--run-dir", str(run), "--no-progress", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_stops_training_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    code, err = _train_then_sigterm(
        run, SINUSOID, ["num_iterations=100000", "checkpoint_every=20", "eval.every=0", "threads=1"], start_timeout=120
    )
    assert code == 130 and "interrupted" in err and "--resume" in err
    # a checkpoint of every iteration done (not only of the last multiple of checkpoint_every)
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == len(read_metrics(run)) > 0


def test_sigterm_stops_training_with_ray_workers(tmp_path):
    """ray.init installs a SIGTERM handler that aborts; metarl keeps its own, so a run on Ray
    workers also stops cleanly with its last checkpoint."""
    run = tmp_path / "run"
    code, err = _train_then_sigterm(
        run,
        REPO_ROOT / "experiments" / "navigation2d" / "maml_trpo.yaml",
        [
            "num_iterations=100000",
            "checkpoint_every=1",
            "threads=1",
            "ray.workers=1",
            "meta_batch_size=2",
            "episodes_per_task=2",
        ],
        start_timeout=420,  # Ray's start-up; on a machine busy with other jobs it took over 180 s
    )
    assert code == 130 and "interrupted" in err and "--resume" in err, err[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == len(read_metrics(run)) >= 1


def test_train_stops_when_the_loss_diverges(tmp_path, monkeypatch):
    """A non-finite training loss stops training at that iteration with one line (exit 1), logs
    nothing for it and leaves the last checkpoint as it was."""
    # An inner step of 1e30 makes the post-adaptation loss non-finite from the first iteration.
    bad = tmp_path / "diverged"
    rc, _, err = train(bad, *SIN, "inner.lr=1e30")
    assert rc == 1, err
    errors = [line for line in err.splitlines() if line.startswith("metarl: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("metarl: error: iteration 0: train/loss_post_adapt is "), errors
    assert "training diverged; no checkpoint was written" in errors[0]
    assert not (bad / "checkpoint.pt").exists()
    assert read_metrics(bad) == []
    # A run whose loss turns NaN at iteration 5: its checkpoint of iteration 4 stays, rows 0-4 are logged.
    from metarl.runs.fewshot import FewShotExperiment

    real = FewShotExperiment.train_iteration

    def nan_at_5(self, it):
        row = real(self, it)
        return {**row, "train/loss_post_adapt": float("nan")} if it == 5 else row

    run = tmp_path / "run"
    ok(train(run, *SIN, "num_iterations=4", "checkpoint_every=2"))
    good = load_checkpoint(run / "checkpoint.pt")
    monkeypatch.setattr(FewShotExperiment, "train_iteration", nan_at_5)
    rc, _, err = cli("train", "--resume", "--run-dir", run, "--no-progress", "num_iterations=8")
    assert rc == 1, err
    assert "iteration 5: train/loss_post_adapt is nan: training diverged; the last checkpoint is kept" in err
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]
    assert_same_state(load_checkpoint(run / "checkpoint.pt"), good, "checkpoint")  # iteration 4's, untouched
