"""ANIL: the head-only inner loop, its second-order meta-gradient, ANIL = MAML on a head-only model, a run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.anil import ANIL, head_names
from agents.maml import MAML
from agents.models import MLP, ConvNet
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.objective import FewShotObjective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def _task(n_way=3, k=2, q=2, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return FewShotBatch(
        torch.rand(n_way * k, *shape, generator=g),
        torch.arange(n_way).repeat_interleave(k),
        torch.rand(n_way * q, *shape, generator=g),
        torch.arange(n_way).repeat_interleave(q),
    )


def _batch(tasks):
    return FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))


def _convnet(batched=False, seed=0):
    torch.manual_seed(seed)
    return ConvNet(n_way=3, filters=4, vmap_safe_norm=batched)


def test_head_names():
    assert head_names(_convnet()) == ["head.weight", "head.bias"]
    assert head_names(MLP(1, [40, 40], 1)) == ["4.weight", "4.bias"]  # the sinusoid MLP's last linear layer
    assert head_names(nn.Linear(4, 3)) == ["weight", "bias"]
    with pytest.raises(ValueError, match="no `head` module and no nn.Linear"):
        head_names(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_adaptation_moves_only_the_head_by_its_gradient():
    model = _convnet()
    learner = ANIL(model, FewShotObjective(model, kind="classification", n_way=3), inner_lrs=[0.4], batched=False)
    task = _task()
    adapted = learner.adapt_task(task, [0.4])
    loss = F.cross_entropy(model(task.support_x), task.support_y)  # by hand: the model's own forward
    g_w, g_b = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
    torch.testing.assert_close(adapted["head.weight"], model.head.weight.detach() - 0.4 * g_w)
    torch.testing.assert_close(adapted["head.bias"], model.head.bias.detach() - 0.4 * g_b)
    for name, p in model.named_parameters():
        if not name.startswith("head."):
            assert torch.equal(adapted[name], p.detach()), name  # the body is theta
    # two steps: the second gradient is taken at the once-adapted head
    twice = learner.adapt_task(task, [0.4, 0.2])
    feats = model.features(task.support_x).flatten(1).detach()
    w1, b1 = adapted["head.weight"].requires_grad_(), adapted["head.bias"].requires_grad_()
    g_w1, g_b1 = torch.autograd.grad(F.cross_entropy(F.linear(feats, w1, b1), task.support_y), [w1, b1])
    torch.testing.assert_close(twice["head.weight"], w1.detach() - 0.2 * g_w1)
    torch.testing.assert_close(twice["head.bias"], b1.detach() - 0.2 * g_b1)


@pytest.fixture
def float64():
    """Double precision, so the two computations agree to rounding on any CPU instruction set."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("batched", [False, True])
def test_meta_gradient_equals_an_independent_second_order_computation(batched, float64):
    model = _convnet(batched)
    reference = copy.deepcopy(model)
    learner = ANIL(
        model, FewShotObjective(model, kind="classification", n_way=3), inner_lrs=[0.4, 0.3], batched=batched
    )
    tasks = [_task(seed=s) for s in (1, 2)]
    learner.step(_batch(tasks), 0)
    # independent: ANIL written out with autograd, the head as an explicit linear map of the body's features
    losses = []
    for t in tasks:
        w, b = reference.head.weight, reference.head.bias
        support_feats = reference.features(t.support_x).flatten(1)
        for lr in (0.4, 0.3):
            g_w, g_b = torch.autograd.grad(
                F.cross_entropy(F.linear(support_feats, w, b), t.support_y), [w, b], create_graph=True
            )
            w, b = w - lr * g_w, b - lr * g_b
        losses.append(F.cross_entropy(F.linear(reference.features(t.query_x).flatten(1), w, b), t.query_y))
    torch.stack(losses).mean().backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-9, atol=1e-12)
    body = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if not n.startswith("head.")])
    assert body.abs().max() > 1e-4  # the outer loop learns the body too
    # the second-order term matters: a first-order head-only gradient is different
    first = copy.deepcopy(reference)
    first.zero_grad()
    ls = []
    for t in tasks:
        w, b = first.head.weight, first.head.bias
        feats = first.features(t.support_x).flatten(1)
        for lr in (0.4, 0.3):
            g_w, g_b = torch.autograd.grad(F.cross_entropy(F.linear(feats, w, b), t.support_y), [w, b])
            w, b = w - lr * g_w, b - lr * g_b
        ls.append(F.cross_entropy(F.linear(first.features(t.query_x).flatten(1), w, b), t.query_y))
    torch.stack(ls).mean().backward()
    assert not torch.allclose(first.features[0].weight.grad, model.features[0].weight.grad, rtol=1e-3, atol=1e-6)


def test_anil_equals_maml_on_a_head_only_model_and_maml_with_a_zero_body_lr():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    twin = copy.deepcopy(linear)
    tasks = [_task(seed=s, shape=(6,)) for s in (1, 2)]
    anil = ANIL(linear, FewShotObjective(linear, kind="classification", n_way=3), inner_lrs=[0.5], batched=False)
    maml = MAML(twin, FewShotObjective(twin, kind="classification", n_way=3), inner_lrs=[0.5], batched=False)
    anil.step(_batch(tasks), 0)
    maml.step(_batch(tasks), 0)
    for a, m in zip(linear.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, m.grad, rtol=0, atol=0)
    # a conv net: ANIL's meta-gradient is MAML's with a zero inner learning rate for the body
    model = _convnet()
    other = copy.deepcopy(model)
    anil = ANIL(model, FewShotObjective(model, kind="classification", n_way=3), inner_lrs=[0.4], batched=False)
    zero_body = {n: (0.4 if n.startswith("head.") else 0.0) for n, _ in other.named_parameters()}
    maml = MAML(other, FewShotObjective(other, kind="classification", n_way=3), inner_lrs=[zero_body], batched=False)
    batch = _batch(tasks := [_task(seed=s) for s in (3, 4)])
    anil.step(batch, 0)
    maml.step(batch, 0)
    for (name, a), m in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(a.grad, m.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_anil_run_trains_evaluates_and_classifies(tmp_path):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/anil_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=8", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "20"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and len(result["steps"]) == 3 + 1  # the config's 3 evaluation steps
    assert result["mean"][-1] > 0.25  # 8 steps of 8 tasks with 8 filters; chance is 0.2
    clf = FewShotClassifier.from_run(run)
    task = _task(n_way=5, k=1, q=1, seed=3)
    adapted = clf.adapt(list(task.support_x[:, 0].numpy()), list("abcde"))
    theta = clf.learner.theta()
    assert all(torch.equal(adapted.params[n], theta[n]) for n in theta if not n.startswith("head."))
    assert not torch.equal(adapted.params["head.weight"], theta["head.weight"])
    assert adapted.predict_proba(list(task.query_x[:, 0].numpy())).shape == (5, 5)
    # the sinusoid MLP: its last layer adapts
    assert main(["train", "experiments/sinusoid/maml.yaml", "algorithm=anil", "num_iterations=5", "eval.every=0",
                 "--run-dir", str(tmp_path / "s"), "--no-progress"]) == 0  # fmt: skip
