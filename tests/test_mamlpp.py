"""MAML++: multi-step loss weights, derivative-order annealing, LSLR, per-step batch norm, cosine outer lr, a run."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agents.mamlpp import MAMLPlusPlus, norm_names
from agents.models import MLP, ConvNet
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.objective import FewShotObjective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def _sine_tasks(num=2, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num, 2 * k, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = torch.sin(x + torch.rand(num, 1, 1, generator=g, dtype=torch.float64)) * 2
    return FewShotBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(1, [8, 8], 1).double()


def _learner(model, kind="regression", **kwargs):
    settings = dict(inner_lrs=[0.1, 0.1], num_iterations=100, msl_iterations=0, first_order_iterations=0)
    settings.update(kwargs)
    return MAMLPlusPlus(model, FewShotObjective(model, kind=kind, n_way=3), **settings)


def _set_lrs(learner, values):
    """values: {name: [alpha_0, ..., alpha_{S-1}]}"""
    with torch.no_grad():
        for name, v in values.items():
            learner.modules.lrs[name.replace(".", "/")].copy_(torch.tensor(v, dtype=torch.float64))


def _mse(model, params, x, y):
    return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)


def _sgd(model, theta, x, y, lrs, *, create_graph):
    """Plain SGD steps with per-name per-step rates {name: [alpha_s]}, written out with autograd."""
    phi = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in theta.items()}
    for s in range(len(next(iter(lrs.values())))):
        grads = torch.autograd.grad(_mse(model, phi, x, y), list(phi.values()), create_graph=create_graph)
        phi = {n: p - lrs[n][s] * g for (n, p), g in zip(phi.items(), grads)}
    return phi


# -- (a) multi-step loss ------------------------------------------------------------------------
def test_msl_weights_by_hand():
    learner = _learner(_mlp(), inner_lrs=[0.1] * 4, msl_iterations=100)
    assert learner.msl_weights(0) == pytest.approx([0.25] * 4)
    assert learner.msl_weights(50) == pytest.approx([0.125, 0.125, 0.125, 0.625])  # 0.25 - 50 / 400
    assert learner.msl_weights(90) == pytest.approx([0.025, 0.025, 0.025, 0.925])
    assert learner.msl_weights(99) == pytest.approx([0.0075, 0.0075, 0.0075, 0.9775])  # the floor 0.03 / 4
    assert learner.msl_weights(100) == [0.0, 0.0, 0.0, 1.0]  # only the last step from msl_iterations on
    assert _learner(_mlp(), inner_lrs=[0.1], msl_iterations=100).msl_weights(0) == [1.0]
    assert _learner(_mlp(), inner_lrs=[0.1] * 3, msl_iterations=0).msl_weights(0) == [0.0, 0.0, 1.0]


def test_meta_loss_is_the_weighted_sum_of_every_steps_query_loss():
    model = _mlp()
    learner = _learner(model, inner_lrs=[0.1, 0.05, 0.02], msl_iterations=10)
    tasks = _sine_tasks()
    loss, _ = learner.meta_loss(learner.theta(), tasks, 4)
    w = [1 / 3 - 4 / 30] * 2 + [1 / 3 + 8 / 30]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    rates = {n: [0.1, 0.05, 0.02] for n in theta}
    expected = []
    for t in range(2):
        x, y, qx, qy = (v[t] for v in tasks)
        per_step = [_mse(model, _sgd(model, theta, x, y, {n: r[:k] for n, r in rates.items()}, create_graph=False),
                         qx, qy) for k in (1, 2, 3)]  # fmt: skip
        expected.append(sum(wi * li for wi, li in zip(w, per_step)))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-10, atol=1e-12)


# -- (b) derivative-order annealing ----------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_first_order_before_the_switch_and_second_order_after(batched):
    model = _mlp()
    learner = _learner(model, first_order_iterations=3, batched=batched)
    tasks = _sine_tasks()

    def reference(theta, *, second_order):
        """FOMAML's or MAML's meta-gradient, with autograd, for the learner's current rates."""
        theta = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
        rates = {n: learner.modules.lrs[n.replace(".", "/")].detach().tolist() for n in theta}
        losses = []
        for t in range(2):
            x, y, qx, qy = (v[t] for v in tasks)
            if second_order:
                phi = _sgd(model, theta, x, y, rates, create_graph=True)
            else:  # each inner gradient a constant: d phi / d theta = I
                phi = {n: theta[n] + (p - theta[n]).detach() for n, p in
                       _sgd(model, theta, x, y, rates, create_graph=False).items()}  # fmt: skip
            losses.append(_mse(model, phi, qx, qy))
        return dict(zip(theta, torch.autograd.grad(torch.stack(losses).mean(), list(theta.values()))))

    for it in range(5):
        theta = learner.theta()
        fomaml, maml = reference(theta, second_order=False), reference(theta, second_order=True)
        metrics = learner.step(tasks, it)
        assert metrics["first_order"] == float(it < 3)
        expected = fomaml if it < 3 else maml
        other = maml if it < 3 else fomaml
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
        assert any(not torch.allclose(p.grad, other[n], rtol=1e-6) for n, p in model.named_parameters())


# -- (c) LSLR -----------------------------------------------------------------------------------
def test_inner_steps_use_the_per_layer_per_step_rates():
    model = _mlp()
    learner = _learner(model)
    names = [n for n, _ in model.named_parameters()]
    rates = {n: [0.02 * (i + 1), 0.05 / (i + 1)] for i, n in enumerate(names)}
    _set_lrs(learner, rates)
    x, y, qx, qy = (v[0] for v in _sine_tasks())
    task = FewShotBatch(x, y, qx, qy)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    for steps in (1, 2, 3):  # step 3 (past the 2 trained) reuses step 2's rates
        by_hand = _sgd(model, theta, x, y, {n: [*r, r[-1]][:steps] for n, r in rates.items()}, create_graph=False)
        adapted = learner.adapt_task(task, [123.0] * steps)  # the configured values are not used
        for n in names:
            torch.testing.assert_close(adapted[n], by_hand[n], rtol=1e-10, atol=1e-12)
    curve = learner.adaptation_curve(_sine_tasks(), [9.0] * 3)["loss"]
    assert curve.shape == (2, 4)
    torch.testing.assert_close(curve[0, 3], _mse(model, by_hand, qx, qy), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order_iterations", [0, 10])
def test_the_learned_rates_receive_their_gradient(first_order_iterations):
    # one step: d L_query(theta - a_n g_n) / d a_n = -<grad_n L_query(phi), g_n>, the same at first and second order
    model = _mlp()
    learner = _learner(model, inner_lrs=[0.1], first_order_iterations=first_order_iterations)
    tasks = _sine_tasks()
    theta = {n: p.detach() for n, p in model.named_parameters()}
    expected = {n: torch.zeros((), dtype=torch.float64) for n in theta}
    for t in range(2):
        x, y, qx, qy = (v[t] for v in tasks)
        g = torch.autograd.grad(
            _mse(model, {n: p.requires_grad_() for n, p in theta.items()}, x, y), list(theta.values())
        )
        phi = {n: (theta[n] - 0.1 * gn).detach().requires_grad_() for n, gn in zip(theta, g)}
        gq = torch.autograd.grad(_mse(model, phi, qx, qy), list(phi.values()))
        for n, gn, gqn in zip(theta, g, gq):
            expected[n] -= (gn * gqn).sum() / 2
    learner.step(tasks, 0)
    for n in theta:
        torch.testing.assert_close(learner.modules.lrs[n.replace(".", "/")].grad, expected[n].reshape(1))
        assert expected[n].abs() > 1e-8


def test_a_rate_pushed_below_zero_is_projected_to_zero():
    # Adam's first step moves each rate by -outer_lr * g / (|g| + eps); with outer_lr 0.6 from 0.3, a rate whose
    # gradient is positive (a longer step overshoots) would land near -0.3 and is set to 0, one with a negative
    # gradient lands near 0.9.
    model = _mlp()
    learner = _learner(model, inner_lrs=[0.3], outer_lr=0.6)
    learner.step(_sine_tasks(), 0)
    signs = set()
    for rates in learner.modules.lrs.values():
        g = rates.grad.item()
        signs.add(g > 0)
        expected = max(0.3 - 0.6 * g / (abs(g) + 1e-8), 0.0)
        assert rates.item() == pytest.approx(expected, rel=1e-6, abs=0.0)
    assert signs == {True, False}  # both cases happen here


# -- (d) per-step batch norm ---------------------------------------------------------------------
def _conv_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    return FewShotBatch(
        torch.rand(6, 1, 28, 28, generator=g),
        torch.arange(3).repeat_interleave(2),
        torch.rand(6, 1, 28, 28, generator=g),
        torch.arange(3).repeat_interleave(2),
    )


@pytest.mark.parametrize("batched", [False, True])
def test_step_s_uses_the_batch_norm_parameters_of_step_s(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=4, vmap_safe_norm=batched)
    learner = _learner(model, kind="classification", inner_lrs=[0.3, 0.2], msl_iterations=10, batched=batched)
    norms = norm_names(model)
    assert norms == [f"features.{i}.{w}" for i in (1, 5, 9, 13) for w in ("weight", "bias")]
    with torch.no_grad():  # distinct sets for step 0 and step 1
        for p in learner.modules.norms.values():
            p.copy_(torch.randn_like(p) * 0.5 + p)
    sets = [{n: learner.modules.norms[n.replace(".", "/")][s].detach() for n in norms} for s in (0, 1)]
    task = _conv_task()
    ref = copy.deepcopy(model)
    body = [n for n, _ in model.named_parameters() if n not in norms]

    def load(phi, bn):  # the reference network with these weights and this batch-norm set
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(bn[n] if n in bn else phi[n])

    phi = {n: p.detach() for n, p in model.named_parameters() if n in body}
    expected_curve, rates = [], [0.3, 0.2, 0.2]  # a third step reuses step 2's rate and set
    load(phi, sets[0])
    expected_curve.append(F.cross_entropy(ref(task.query_x), task.query_y))
    for s, lr in enumerate(rates):
        bn = sets[min(s, 1)]
        load(phi, bn)
        loss = F.cross_entropy(ref(task.support_x), task.support_y)
        params = dict(ref.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in body])
        phi = {n: phi[n] - lr * g for n, g in zip(body, grads)}
        load(phi, bn)
        expected_curve.append(F.cross_entropy(ref(task.query_x), task.query_y).detach())
        if s == 1:
            load(phi, bn)
            with torch.no_grad():
                expected_out = ref(torch.cat([task.support_x, task.query_x]))[6:]
    batch = FewShotBatch(*(x.unsqueeze(0) for x in task))
    curve = learner.adaptation_curve(batch, [0.0] * 3)["loss"][0]
    torch.testing.assert_close(curve, torch.stack(expected_curve).detach(), rtol=1e-4, atol=1e-5)
    out = learner.task_outputs(learner.adapt_task(task, [0.0, 0.0]), task.support_x, task.query_x)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    # training: both sets learn (the multi-step loss weighs both steps), the model's own batch-norm weights are unused
    learner.step(FewShotBatch(*(torch.stack([a, b]) for a, b in zip(task, _conv_task(1)))), 0)
    for p in learner.modules.norms.values():
        assert p.grad[0].abs().max() > 0 and p.grad[1].abs().max() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n in norms)


# -- (e) cosine outer learning rate ----------------------------------------------------------------
def test_cosine_annealed_outer_lr_by_hand():
    model = _mlp()
    learner = _learner(model, outer_lr=1e-2, min_outer_lr=1e-4, num_iterations=8)
    tasks = _sine_tasks()
    for it in range(8):
        expected = 1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * it / 8)) / 2
        assert learner.step(tasks, it)["outer_lr"] == pytest.approx(expected, rel=1e-9)
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(
            1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * (it + 1) / 8)) / 2, rel=1e-9
        )
    # the learned rates and batch-norm sets are with Adam: they move
    assert not torch.allclose(learner.modules.lrs["0/weight"], torch.tensor([0.1, 0.1], dtype=torch.float64))


def test_state_round_trip_and_config_errors(tmp_path, capsys):
    model = _mlp()
    learner = _learner(model, num_iterations=8)
    for it in range(3):
        learner.step(_sine_tasks(seed=it), it)
    twin = copy.deepcopy(model)
    fresh = _learner(twin, num_iterations=8)
    fresh.load_state_dict(copy.deepcopy(learner.state_dict()))
    for (k, a), b in zip(learner.modules.state_dict().items(), fresh.modules.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.scheduler.last_epoch == 3
    assert fresh.optimizer.param_groups[0]["lr"] == learner.optimizer.param_groups[0]["lr"]
    for it in range(3, 6):  # a resumed learner continues exactly as the uninterrupted one
        assert learner.step(_sine_tasks(seed=it), it) == fresh.step(_sine_tasks(seed=it), it)
    for a, b in zip(
        [*model.parameters(), *learner.modules.parameters()], [*twin.parameters(), *fresh.modules.parameters()]
    ):
        assert torch.equal(a, b)
    # resumed with a longer run: the cosine of the new length, at the same iteration
    longer = _learner(copy.deepcopy(model), num_iterations=20)
    longer.load_state_dict(copy.deepcopy(learner.state_dict()))
    expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 6 / 20)) / 2
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert longer.step(_sine_tasks(), 6)["outer_lr"] == pytest.approx(expected, rel=1e-12)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 7 / 20)) / 2, rel=1e-9
    )

    from metarl.app.cli import main

    assert main(["train", "experiments/sinusoid/mamlpp.yaml", "eval.lr=0.1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "eval.lr: mamlpp learns its inner updates; eval.lr does not apply" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_mamlpp_run_trains_evaluates_and_classifies(tmp_path):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main
    from metarl.runs.rundir import load_checkpoint

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/mamlpp_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=6", "inner.steps=2", "eval.steps=3",
            "mamlpp.msl_iterations=3", "mamlpp.first_order_iterations=3", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/first_order"] for r in rows] == [1.0] * 3 + [0.0] * 3
    assert main(["evaluate", str(run), "--num-tasks", "20"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["steps"] == [0, 1, 2, 3] and result["mean"][-1] > 0.25  # chance is 0.2
    clf = FewShotClassifier.from_run(run)
    saved = load_checkpoint(run / "checkpoint.pt")["learner"]["modules"]
    for key, value in clf.learner.modules.state_dict().items():  # the learned rates and sets came back
        assert torch.equal(value, saved[key]), key
    assert not torch.allclose(clf.learner.modules.lrs["head/weight"], torch.full((2,), 0.1))  # learned
    support = list(torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(3)).numpy())
    adapted = clf.adapt(support, list("abcde"))
    assert set(adapted.predict(support)) <= set("abcde")
    assert adapted.params["features.1.weight"].shape == (8,)  # the last step's batch-norm set
    torch.testing.assert_close(adapted.params["features.1.weight"], clf.learner.modules.norms["features/1/weight"][1])
