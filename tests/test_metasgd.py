"""Meta-SGD: the inner step with learned per-coordinate learning rates, their meta-gradient, checkpoints, runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.metasgd import MetaSGD
from agents.models import MLP
from metarl.core.functional import params_of
from metarl.fewshot.objective import FewShotObjective
from metarl.fewshot.sinusoid import SinusoidTasks

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def _sinusoid_learner(*, steps=1, batched=True, dtype=torch.float32, hidden=(4,), seed=0):
    torch.manual_seed(seed)
    model = MLP(1, list(hidden), 1).to(dtype)
    learner = MetaSGD(
        model, FewShotObjective(model, kind="regression"), steps=steps, alpha_init="uniform", batched=batched
    )
    tasks = SinusoidTasks(k_shot=5, k_query=7).sample(3, np.random.default_rng(seed))
    return model, learner, type(tasks)(*(t.to(dtype) for t in tasks))


def _by_hand(model, alpha, x, y, steps):
    """``steps`` steps of ``p - alpha * grad`` of the support MSE, with torch.autograd on the model itself."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(steps):
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        out = torch.func.functional_call(model, leaves, (x,))
        grads = torch.autograd.grad(F.mse_loss(out, y), list(leaves.values()))
        params = {k: (v - alpha[k] * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    return params


@pytest.mark.parametrize("steps", [1, 2])
def test_inner_step_is_theta_minus_alpha_times_gradient(steps):
    model, learner, tasks = _sinusoid_learner(steps=steps)
    alpha = {k: v.detach() for k, v in learner.alpha.as_dict().items()}
    assert all(a.shape == p.shape for a, p in zip(alpha.values(), model.parameters(), strict=True))
    assert float(min(a.min() for a in alpha.values())) >= 0.005 and float(max(a.max() for a in alpha.values())) < 0.1
    with torch.no_grad():
        phi = learner.adapt(learner.theta(), tasks, lrs=[123.0] * steps)  # the values are alpha's, not these
    for i in range(3):
        expected = _by_hand(model, alpha, tasks.support_x[i], tasks.support_y[i], steps)
        for name, value in expected.items():
            torch.testing.assert_close(phi[name][i], value, rtol=1e-5, atol=1e-6)
    # evaluation and adapt_task use alpha too: column s of the curve is the query MSE after s steps of alpha
    curve = learner.adaptation_curve(tasks, [0.5, 0.5])["loss"]
    for i in range(3):
        for s in (0, 1, 2):
            p = _by_hand(model, alpha, tasks.support_x[i], tasks.support_y[i], s)
            mse = F.mse_loss(torch.func.functional_call(model, p, (tasks.query_x[i],)), tasks.query_y[i])
            assert float(curve[i, s]) == pytest.approx(float(mse), rel=1e-5)
    one = type(tasks)(*(t[0] for t in tasks))
    adapted = learner.adapt_task(one, [0.5] * steps)
    for name, value in _by_hand(model, alpha, one.support_x, one.support_y, steps).items():
        torch.testing.assert_close(adapted[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batched", [True, False])
def test_alpha_and_theta_gradients_match_finite_differences(batched):
    model, learner, tasks = _sinusoid_learner(steps=2, batched=batched, dtype=torch.float64, hidden=(3,))
    loss, _ = learner.meta_loss(params_of(model), tasks)
    loss.backward()
    for group, tensors in (("alpha", list(learner.alpha.lrs)), ("theta", list(model.parameters()))):
        for tensor in tensors:
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"no gradient reaches {group}"
            numeric = torch.zeros_like(tensor)
            flat = tensor.data.view(-1)
            for j in range(flat.numel()):  # central differences of the meta-loss, every coordinate
                saved = float(flat[j])
                values = []
                for delta in (1e-6, -1e-6):
                    flat[j] = saved + delta
                    with torch.no_grad():
                        values.append(float(learner.meta_loss(params_of(model), tasks)[0]))
                flat[j] = saved
                numeric.view(-1)[j] = (values[0] - values[1]) / 2e-6
            torch.testing.assert_close(tensor.grad, numeric, rtol=1e-5, atol=1e-8)
    # one step moves alpha by Adam's first step (lr x sign of its gradient)
    before = [a.detach().clone() for a in learner.alpha.lrs]
    learner.optimizer.zero_grad()
    learner.step(tasks, 0)
    for a, b in zip(learner.alpha.lrs, before, strict=True):
        moved = (a.detach() - b).abs()
        assert torch.allclose(moved[a.grad.abs() > 1e-6], torch.tensor(1e-3, dtype=a.dtype), rtol=1e-3)


def test_alpha_is_checkpointed_with_the_optimizer():
    model, learner, tasks = _sinusoid_learner()
    learner.step(tasks, 0)
    state = learner.state_dict()
    _, other, _ = _sinusoid_learner(seed=5)
    other.load_state_dict(state)
    for a, b in zip(learner.alpha.lrs, other.alpha.lrs, strict=True):
        torch.testing.assert_close(a, b)
    assert other.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()
    assert len(other.optimizer.param_groups[0]["params"]) == len(list(model.parameters())) * 2


def test_metasgd_sinusoid_run_trains_and_evaluates(tmp_path, capsys):
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/sinusoid/metasgd.yaml", "--run-dir", str(run), "--no-progress",
            "num_iterations=60", "eval.every=0", "threads=1"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "mse" and result["steps"] == list(range(11))
    assert result["mean"][1] < result["mean"][0]  # one step of alpha helps already
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(state["learner"]["alpha"]) == 6  # one alpha per parameter tensor of the 1-40-40-1 MLP
    capsys.readouterr()
    assert main(["train", "experiments/sinusoid/metasgd.yaml", "eval.lr=0.1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "eval.lr: metasgd learns its inner updates" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_metasgd_omniglot_run_round_trips_alpha_through_the_classifier(tmp_path):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main
    from metarl.fewshot.images import preprocess_images

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/metasgd_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=15", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "50"]) == 0
    assert json.loads((run / "eval.json").read_text())["steps"] == [0, 1, 2, 3]
    clf = FewShotClassifier.from_run(run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    alpha = dict(zip(clf.learner.alpha.names, state["learner"]["alpha"].values(), strict=True))
    assert any((a - 0.4).abs().max() > 1e-4 for a in alpha.values())  # meta-training moved alpha off inner.lr
    for name, a in clf.learner.alpha.as_dict().items():
        torch.testing.assert_close(a.detach(), alpha[name])
    g = torch.Generator().manual_seed(0)
    support, query = torch.rand(5, 28, 28, generator=g), torch.rand(3, 28, 28, generator=g)
    adapted = clf.adapt(list(support.numpy()), list("abcde"), steps=1)
    proba = adapted.predict_proba(list(query.numpy()))
    # by hand: the checkpoint's theta, one step of the checkpoint's alpha, the model on support + query
    model = clf.model
    theta = {k: v for k, v in state["model"].items() if k in dict(model.named_parameters())}
    sx, qx = (
        preprocess_images(list(support.numpy()), image_size=28),
        preprocess_images(list(query.numpy()), image_size=28),
    )
    phi = _by_hand_classifier(model, theta, alpha, sx, torch.arange(5))
    logits = torch.func.functional_call(model, phi, (torch.cat([sx, qx]),))[5:]
    np.testing.assert_allclose(proba, torch.softmax(logits, -1).detach().numpy(), rtol=1e-4, atol=1e-6)


def _by_hand_classifier(model, theta, alpha, x, y):
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    loss = F.cross_entropy(torch.func.functional_call(model, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: (v - alpha[k] * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
