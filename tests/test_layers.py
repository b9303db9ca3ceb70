"""The one-core structure: the algorithm registry (a new algorithm is one module plus a YAML),
the layer contract, and Ray only where it is used."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from metarl.app.cli import main
from metarl.core.functional import inner_lrs, params_of
from metarl.core.learner import Learner, algorithms, register
from metarl.core.metalearning import batch_objective

ROOT = Path(__file__).resolve().parents[1]


class ToyLearner(Learner):
    """A made-up algorithm: one SGD step on the mean post-adaptation query loss, lr 0.01."""

    def __init__(self, model, objective, *, inner_lrs):
        self.model = model
        self.objective = batch_objective(objective)
        self.inner_lrs = inner_lrs
        self.calls = []

    def step(self, batch, iteration):
        self.calls.append(iteration)
        loss, metrics = self.objective.meta_loss(params_of(self.model), batch, lrs=self.inner_lrs, first_order=True)
        grads = torch.autograd.grad(loss, list(params_of(self.model).values()))
        with torch.no_grad():
            for p, g in zip(params_of(self.model).values(), grads):
                p.sub_(0.01 * g)
        return {"toy_loss": float(loss), "toy_iteration": float(iteration)}


BUILT: list[ToyLearner] = []


@register("toy", family="fewshot")
def build_toy(cfg, model, objective):
    BUILT.append(ToyLearner(model, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps)))
    return BUILT[-1]


def test_a_registered_toy_algorithm_trains_through_metarl_train(tmp_path):
    assert "toy" in algorithms("fewshot") and "toy" not in algorithms("rl")
    config = tmp_path / "toy.yaml"
    config.write_text(
        textwrap.dedent("""\
        family: sinusoid
        algorithm: toy
        num_iterations: 3
        meta_batch_size: 4
        checkpoint_every: 1
        inner: {steps: 1, lr: 0.01}
        eval: {steps: 1, num_tasks: 8, every: 0, chunk: 8}
    """)
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--no-progress"]) == 0
    learner = BUILT[-1]
    assert learner.calls == [0, 1, 2]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/toy_iteration"] for r in rows] == [0.0, 1.0, 2.0]
    assert all(r["train/toy_loss"] > 0 for r in rows)
    assert main(["evaluate", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["metric"] == "mse"


def test_an_unregistered_algorithm_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("family: sinusoid\nalgorithm: nope\nnum_iterations: 1\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "algorithm" in err and "maml" in err and "reptile" in err
    assert not (tmp_path / "r").exists()


def test_every_config_algorithm_is_registered():
    import agents  # noqa: F401

    assert {"maml", "fomaml", "reptile", "pretrain"} <= set(algorithms("fewshot"))
    assert {"maml_trpo", "fomaml", "reptile"} <= set(algorithms("rl"))


def test_learners_sampler_fewshot_adapt_and_evaluate_run_without_ray(tmp_path):
    """A GPU machine without Ray must run the learner: hide `ray` and run every Ray-free path."""
    script = textwrap.dedent(f"""\
        import sys
        sys.modules["ray"] = None  # `import ray` now raises ImportError
        import metarl
        from metarl.app.cli import main
        nav = {str(ROOT / "experiments/navigation2d/maml_trpo.yaml")!r}
        tiny = ["num_iterations=2", "meta_batch_size=2", "episodes_per_task=2", "eval.num_tasks=2", "eval.steps=1",
                "threads=1", "--no-progress"]
        assert main(["train", nav, *tiny, "--run-dir", {str(tmp_path / "nav")!r}]) == 0
        assert main(["evaluate", {str(tmp_path / "nav")!r}]) == 0
        adapted = metarl.load({str(tmp_path / "nav")!r}).adapt({{"goal": [0.2, -0.1]}}, episodes=2)
        assert len(adapted.returns) == 2
        sin = {str(ROOT / "experiments/sinusoid/reptile.yaml")!r}
        assert main(["train", sin, "num_iterations=2", "meta_batch_size=2", "eval.every=0", "eval.num_tasks=4",
                     "eval.chunk=4", "--no-progress", "--run-dir", {str(tmp_path / "sin")!r}]) == 0
        assert main(["evaluate", {str(tmp_path / "sin")!r}]) == 0
        assert sys.modules["ray"] is None
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_a_kill_between_the_row_and_the_checkpoint_leaves_no_gap(tmp_path, monkeypatch):
    """The row of an iteration is written before its checkpoint: a kill between the two leaves an
    extra row, which the resume drops and writes again, so the log equals an uninterrupted run's."""
    import metarl.runs.experiment as experiment
    from metarl.runs.rundir import load_checkpoint

    config = ROOT / "experiments/sinusoid/maml.yaml"
    args = ["num_iterations=4", "meta_batch_size=3", "checkpoint_every=2", "eval.every=0", "threads=1", "--no-progress"]
    assert main(["train", str(config), *args, "--run-dir", str(tmp_path / "whole")]) == 0

    real_save = experiment.save_checkpoint

    def killed_at_the_last_checkpoint(state, path):
        if state["iteration"] == 4:
            raise KeyboardInterrupt  # the process dies after writing row 3, before its checkpoint
        real_save(state, path)

    monkeypatch.setattr(experiment, "save_checkpoint", killed_at_the_last_checkpoint)
    run = tmp_path / "killed"
    assert main(["train", str(config), *args, "--run-dir", str(run)]) == 130
    assert [r["iteration"] for r in _rows(run)] == [0, 1, 2, 3]
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2
    monkeypatch.setattr(experiment, "save_checkpoint", real_save)
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    assert _rows(run) == _rows(tmp_path / "whole")
