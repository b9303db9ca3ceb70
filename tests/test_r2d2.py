"""R2-D2: the closed-form ridge head, its logits, gradients to lambda / alpha / beta, training runs.

References are independent of agents/r2d2.py: the primal ridge solution (X^T X + lambda I)^-1 X^T Y
in numpy float64, the backbone's own conv blocks, and central finite differences of the loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.models import ConvNet
from agents.r2d2 import R2D2, ridge_weights
from metarl.core.functional import params_of
from metarl.fewshot.batch import FewShotBatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def primal_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


@pytest.mark.parametrize(("m", "d"), [(6, 10), (12, 4)])  # fewer and more examples than features
def test_ridge_head_is_the_primal_closed_form(m, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(m, d)), np.eye(3)[rng.integers(0, 3, size=m)]
    for lam in (0.3, 5.0):
        w = ridge_weights(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(lam, dtype=torch.float64))
        np.testing.assert_allclose(w.numpy(), primal_ridge(x, y, lam), rtol=1e-10, atol=1e-12)
    # float32 on a problem of the few-shot size
    w32 = ridge_weights(torch.from_numpy(x).float(), torch.from_numpy(y).float(), torch.tensor(0.3))
    np.testing.assert_allclose(w32.numpy(), primal_ridge(x, y, 0.3), rtol=1e-4, atol=1e-5)


def _task(n_way=3, k=2, q=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return FewShotBatch(
        torch.rand(n_way * k, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n_way).repeat_interleave(k),
        torch.rand(n_way * q, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n_way).repeat_interleave(q),
    )


def test_task_logits_are_scaled_ridge_predictions():
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8).double()
    learner = R2D2(model, n_way=3, init_lambda=0.7, init_alpha=2.5, init_beta=0.4)
    task = _task(dtype=torch.float64)
    logits = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x).detach()
    with torch.no_grad():  # independently: the conv blocks on all images, then the primal ridge in numpy
        z = model.features(torch.cat([task.support_x, task.query_x])).flatten(1).numpy()
    w = primal_ridge(z[:6], np.eye(3)[task.support_y.numpy()], 0.7)
    np.testing.assert_allclose(logits.numpy(), 2.5 * z[6:] @ w + 0.4, rtol=1e-6, atol=1e-8)
    # the head's lambda is exp(log lambda), alpha and beta as given
    assert float(learner.modules.lam.detach()) == pytest.approx(0.7)
    assert learner.modules.log_lambda.device == next(model.parameters()).device


def test_gradients_reach_lambda_alpha_and_beta():
    """Autograd through torch.linalg.solve against central differences of the query loss (float64)."""
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8).double()
    learner = R2D2(model, n_way=3, init_lambda=0.7, init_alpha=2.5, init_beta=0.4)
    task = _task(dtype=torch.float64)
    head = learner.modules

    def loss() -> torch.Tensor:
        logits = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
        return F.cross_entropy(logits, task.query_y)

    value = loss()
    value.backward()
    eps = 1e-4  # the conv forward varies in its last digits between calls; a larger step keeps that out
    for p in (head.log_lambda, head.alpha):
        with torch.no_grad():
            p += eps
            up = float(loss())
            p -= 2 * eps
            down = float(loss())
            p += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd) > 1e-4  # the loss depends on it
        assert float(p.grad) == pytest.approx(fd, rel=1e-3)
    # beta shifts every logit by the same amount, which the softmax ignores: its gradient is 0
    # (it is in the graph: the logits move by exactly the change in beta)
    assert head.beta.grad is not None and abs(float(head.beta.grad)) < 1e-12
    with torch.no_grad():
        before = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
        head.beta += 1.5
        after = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
    torch.testing.assert_close(after - before, torch.full_like(before, 1.5))
    # the backbone learns through the solve
    logits = learner.task_logits(params_of(model), task.support_x, task.support_y, task.query_x)
    F.cross_entropy(logits, task.query_y).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.features.parameters())


@pytest.mark.parametrize("batched", [False, True])
def test_step_updates_backbone_and_head_with_one_adam_step(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    learner = R2D2(model, n_way=3, init_lambda=2.0, init_alpha=3.0, outer_lr=1e-2, batched=batched)
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    # by hand: mean over tasks of the cross-entropy of alpha * f(q) W + beta
    losses = []
    for t in tasks:
        z = model.features(torch.cat([t.support_x, t.query_x])).flatten(1)
        lam = torch.tensor(2.0, requires_grad=True)
        x = z[:6]
        w = torch.linalg.inv(x.T @ x + lam * torch.eye(x.shape[1])) @ x.T @ F.one_hot(t.support_y, 3).float()
        losses.append(F.cross_entropy(3.0 * z[6:] @ w, t.query_y))
    expected = float(torch.stack(losses).mean().detach())
    metrics = learner.step(batch, 0)
    assert metrics["loss_post_adapt"] == pytest.approx(expected, rel=1e-4)
    # Adam's first step moves lambda (through its log) and alpha by the learning rate
    assert abs(math.log(metrics["lambda"]) - math.log(2.0)) == pytest.approx(1e-2, rel=1e-3)
    assert abs(metrics["alpha"] - 3.0) == pytest.approx(1e-2, rel=1e-3)
    state = learner.state_dict()
    assert set(state["modules"]) == {"log_lambda", "alpha", "beta"}
    fresh = R2D2(ConvNet(n_way=3, filters=8, vmap_safe_norm=batched), n_way=3, batched=batched)
    fresh.load_state_dict(state)
    assert float(fresh.modules.lam.detach()) == pytest.approx(metrics["lambda"])


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_r2d2_run_trains_evaluates_and_classifies(tmp_path, capsys):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/r2d2_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=40", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0]
    assert result["mean"][0] > 0.35  # chance is 0.2
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    clf = FewShotClassifier.from_run(run)  # the learned lambda and alpha come back with the checkpoint
    assert float(clf.learner.modules.lam.detach()) == pytest.approx(last["train/lambda"], rel=1e-6)
    assert float(clf.learner.modules.alpha.detach()) == pytest.approx(last["train/alpha"], rel=1e-6)
    assert last["train/lambda"] != pytest.approx(1.0, abs=1e-3)
    images = list(np.random.default_rng(3).random((5, 28, 28)))
    adapted = clf.adapt(images, list("abcde"))
    assert list(adapted.predict(images)) == list("abcde")  # ridge regression fits its own support set
    capsys.readouterr()
    assert main(["train", "experiments/sinusoid/maml.yaml", "algorithm=r2d2", "--run-dir", str(tmp_path / "s")]) == 2
    assert "r2d2 classifies images; use it with family omniglot" in capsys.readouterr().err
