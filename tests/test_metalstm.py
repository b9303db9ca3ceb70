"""The Meta-Learner LSTM: preprocessing, the update as SGD when its gates are fixed, where gradients reach, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.metalstm import MetaLearnerLSTM, MetaLSTM, preprocess, support_stat_outputs
from agents.models import MLP, ConvNet, lstm_step
from metarl.core.functional import params_of
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.objective import FewShotObjective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_preprocessing_by_hand_in_both_branches():
    x = torch.tensor([0.5, -2.0, 3e4, 1e-5, -3e-5, 0.0], dtype=torch.float64)
    expected = torch.tensor(
        [
            [math.log(0.5) / 10, 1.0],  # |x| >= e^-10: (log|x| / p, sign x)
            [math.log(2.0) / 10, -1.0],
            [math.log(3e4) / 10, 1.0],
            [-1.0, math.exp(10) * 1e-5],  # |x| < e^-10 = 4.54e-5: (-1, e^p x)
            [-1.0, -math.exp(10) * 3e-5],
            [-1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(preprocess(x, 10.0), expected)
    # another p moves the threshold: 1e-3 is above e^-10 but below e^-5
    torch.testing.assert_close(preprocess(torch.tensor([1e-3]), 5.0), torch.tensor([[-1.0, math.exp(5) * 1e-3]]))


def test_lstm_step_is_torchs():
    torch.manual_seed(0)
    meta = MetaLearnerLSTM(6)
    x, h, c = torch.randn(7, 4), torch.randn(7, 6), torch.randn(7, 6)
    for mine, torchs in zip(lstm_step(meta.lstm, x, (h, c)), meta.lstm(x, (h, c)), strict=True):
        torch.testing.assert_close(mine, torchs)


def _task(n_way=3, k=2, q=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return FewShotBatch(
        torch.rand(n_way * k, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n_way).repeat_interleave(k),
        torch.rand(n_way * q, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(n_way).repeat_interleave(q),
    )


def _learner(model, kind="classification", steps=3, **kwargs):
    objective = FewShotObjective(model, kind=kind, n_way=3)
    meta = MetaLearnerLSTM(8).to(next(model.parameters()).dtype)
    return MetaLSTM(model, objective, steps=steps, meta_learner=meta, **kwargs)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_update_is_plain_sgd_when_the_gates_are_fixed(kind):
    torch.manual_seed(0)
    dtype = torch.float64
    if kind == "classification":
        model, task = ConvNet(n_way=3, filters=4).to(dtype), _task(dtype=dtype)
    else:
        model = MLP(1, [8], 1).to(dtype)
        x = torch.linspace(-3, 3, 6, dtype=dtype)[:, None]
        task = FewShotBatch(x, torch.sin(x), x, torch.sin(x))
    learner = _learner(model, kind=kind)
    lr = 0.05
    with torch.no_grad():  # forget gate = 1, input gate = lr, whatever the LSTM's output
        learner.meta.forget.weight.zero_(), learner.meta.forget.bias.fill_(40.0)
        learner.meta.input.weight.zero_(), learner.meta.input.bias.fill_(math.log(lr / (1 - lr)))
    path = learner.unroll(learner.theta(), task, 3)
    # an independent SGD loop on the model itself
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}
    for t in range(3):
        for name, value in reference.items():
            torch.testing.assert_close(path[t][name].detach(), value, rtol=1e-9, atol=1e-12)
        leaves = {k: v.requires_grad_() for k, v in reference.items()}
        out = torch.func.functional_call(model, leaves, (task.support_x,))
        loss = F.cross_entropy(out, task.support_y) if kind == "classification" else F.mse_loss(out, task.support_y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        reference = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    for name, value in reference.items():
        torch.testing.assert_close(path[3][name].detach(), value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_meta_gradient_reaches_the_gates_the_lstm_and_c0(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=4, vmap_safe_norm=batched)
    learner = _learner(model, steps=2, batched=batched, grad_clip=0.0)
    batch = FewShotBatch(*(torch.stack(x) for x in zip(_task(seed=1), _task(seed=2))))
    before = {k: v.detach().clone() for k, v in learner.meta.named_parameters()}
    theta = {k: v.clone() for k, v in learner.theta().items()}
    metrics = learner.step(batch, 0)
    assert set(metrics) == {"loss_pre_adapt", "accuracy_pre_adapt", "loss_post_adapt", "accuracy_post_adapt"}
    for name in ("forget.weight", "forget.bias", "input.weight", "input.bias", "lstm.weight_ih", "lstm.weight_hh"):
        grad = dict(learner.meta.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert not torch.equal(dict(learner.meta.named_parameters())[name].detach(), before[name]), name
    for name, p in model.named_parameters():  # c_0: the learner's own initialisation
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), theta[name]), name


def test_gate_bias_gradients_match_finite_differences():
    """d L_query / d b_I and d b_F against central differences of the same unroll with the learner's
    gradients and losses held at their recorded values (the paper drops the second derivatives)."""
    torch.manual_seed(0)
    model = MLP(1, [5], 1).to(torch.float64)
    learner = _learner(model, kind="regression", steps=3, grad_clip=0.0)
    x = torch.linspace(-3, 3, 8, dtype=torch.float64)[:, None]
    task = FewShotBatch(x[::2], torch.sin(x[::2]), x[1::2], torch.sin(x[1::2]))
    update = learner.meta.forward
    inputs = []

    def recording(grad, loss, c, state):
        inputs.append((grad, loss))
        return update(grad, loss, c, state)

    def query_loss() -> torch.Tensor:
        return learner.objective.query_metrics(learner.unroll(params_of(model), task, 3)[-1], task)["loss"]

    learner.meta.forward = recording
    query_loss().backward()
    for bias in (learner.meta.input.bias, learner.meta.forget.bias):
        replayed = {}
        for sign in (1, -1):
            replay = iter(inputs)
            learner.meta.forward = lambda grad, loss, c, state, replay=replay: update(*next(replay), c, state)
            with torch.no_grad():
                saved = float(bias)
                bias.fill_(saved + sign * 1e-6)
                replayed[sign] = float(query_loss())
                learner.meta.forward = update  # the full function: gradients recomputed at each c_t
                bias.fill_(saved + sign * 1e-6)
                replayed[2 * sign] = float(query_loss())
                bias.fill_(saved)
        assert float(bias.grad) != 0.0
        assert float(bias.grad) == pytest.approx((replayed[1] - replayed[-1]) / 2e-6, rel=1e-5)
        # the dropped second derivatives matter: the full function's slope differs
        assert float(bias.grad) != pytest.approx((replayed[2] - replayed[-2]) / 2e-6, rel=1e-2)


def test_support_statistics_batch_norm_at_evaluation():
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=4)
    task = _task()
    with torch.no_grad():
        out = support_stat_outputs(model, params_of(model), task.support_x, task.query_x)
        # independently: every batch norm in inference mode with the support activations' statistics
        h_s, h_q = task.support_x, task.query_x
        for layer in model.features:
            if isinstance(layer, torch.nn.BatchNorm2d):
                mean, var = h_s.mean(dim=(0, 2, 3)), h_s.var(dim=(0, 2, 3), unbiased=False)
                h_s, h_q = (
                    F.batch_norm(h, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps) for h in (h_s, h_q)
                )
            else:
                h_s, h_q = layer(h_s), layer(h_q)
        expected = model.head(h_q.flatten(1))
        joint = model(torch.cat([task.support_x, task.query_x]))[len(task.support_x) :]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - joint).abs().max() > 1e-3  # not the joint batch's statistics


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_metalstm_run_trains_evaluates_and_classifies(tmp_path):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/metalstm_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=20", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "50"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and len(result["steps"]) == 6
    assert result["mean"][-1] > result["mean"][0] + 0.05  # the LSTM's updates help (measured 0.17 -> 0.27)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    clf = FewShotClassifier.from_run(run)
    for name, value in clf.learner.meta.state_dict().items():
        torch.testing.assert_close(value, state["learner"]["meta_learner"][name])
    g = torch.Generator().manual_seed(0)
    support = torch.rand(5, 28, 28, generator=g)
    adapted = clf.adapt(list(support.numpy()), list("abcde"))
    proba = adapted.predict_proba(list(torch.rand(4, 28, 28, generator=g).numpy()))
    assert proba.shape == (4, 5) and np.allclose(proba.sum(-1), 1.0, atol=1e-5)
    # the adapted parameters are the LSTM's unroll from the checkpoint's c_0 (5 updates)
    assert not torch.equal(adapted.params["head.weight"], state["model"]["head.weight"])
