"""iMAML: conjugate gradient, the proximal inner solver, the implicit meta-gradient, training runs.

References are independent of agents/imaml.py: torch.linalg.solve on explicit matrices, explicit
Hessians from torch.autograd.functional.hessian, the closed-form proximal solution of a linear
model, and central finite differences of the query loss at a proximal solution found by the
test's own gradient descent (float64 throughout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.imaml import (
    IMAML,
    conjugate_gradient,
    implicit_gradient,
    newton_steps,
    proximal_objective,
    proximal_steps,
)
from metarl.core.functional import params_of
from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.objective import FewShotObjective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


class TinyTanh(nn.Module):
    """1 -> 4 -> 1 with tanh (smooth: clean Hessians and finite differences)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def regression_task(seed: int, k: int = 6, q: int = 5, d: int = 1) -> FewShotBatch:
    g = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(q, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    return FewShotBatch(sx, torch.sin(sx @ w) + 0.3, qx, torch.sin(qx @ w) + 0.3)


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflat(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def mse(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)


# -- conjugate gradient -------------------------------------------------------------------------
def test_conjugate_gradient_solves_against_linalg_solve():
    g = torch.Generator().manual_seed(0)
    like = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, 2, dtype=torch.float64)}
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    hessian = q @ torch.diag(torch.tensor([-0.8, -0.2, 0.1, 0.5, 2.0, 4.0, 9.0], dtype=torch.float64)) @ q.T
    lam = 2.0
    a = torch.eye(7, dtype=torch.float64) + hessian / lam  # positive definite: smallest eigenvalue 0.6
    b = torch.randn(7, generator=g, dtype=torch.float64)

    def matvec(v):
        return unflat(a @ flat(v), like)

    x, residual, _ = conjugate_gradient(matvec, unflat(b, like), 7)  # exact in n steps
    torch.testing.assert_close(flat(x), torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert float(residual) < 1e-9
    x, residual, _ = conjugate_gradient(matvec, unflat(b, like), 30)  # steps past convergence change nothing
    torch.testing.assert_close(flat(x), torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    # one iteration is the exact line search along b: x = (b.b / b.Ab) b, residual ||b - A x|| / ||b||
    x1, residual1, _ = conjugate_gradient(matvec, unflat(b, like), 1)
    expected = (b @ b) / (b @ a @ b) * b
    torch.testing.assert_close(flat(x1), expected)
    torch.testing.assert_close(residual1, torch.linalg.norm(b - a @ expected) / torch.linalg.norm(b))


def test_truncated_conjugate_gradient_stops_at_negative_curvature():
    like = {"a": torch.zeros(2, dtype=torch.float64)}
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))  # indefinite

    def matvec(v):
        return unflat(a @ flat(v), like)

    # b.Ab = 0.25 - 1 < 0 at once: x = b (A taken as I), residual ||b - A b|| / ||b||
    b = torch.tensor([0.5, 1.0], dtype=torch.float64)
    x, residual, negative = conjugate_gradient(matvec, unflat(b, like), 5, truncate=True)
    torch.testing.assert_close(flat(x), b)
    torch.testing.assert_close(residual, torch.linalg.norm(b - a @ b) / torch.linalg.norm(b))
    assert bool(negative)
    # b.Ab = 1 - 0.25 > 0: one CG step, then the next direction (by CG's formulas, here by hand)
    # has p.Ap < 0, so x stays the first iterate (b.b / b.Ab) b = 5/3 b
    b = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x1 = (b @ b) / (b @ a @ b) * b
    r1 = b - (b @ b) / (b @ a @ b) * (a @ b)
    p1 = r1 + (r1 @ r1) / (b @ b) * b
    assert float(p1 @ a @ p1) < 0
    x, _, negative = conjugate_gradient(matvec, unflat(b, like), 5, truncate=True)
    torch.testing.assert_close(flat(x), x1)
    assert bool(negative)
    plain, _, met = conjugate_gradient(matvec, unflat(b, like), 2)  # the plain CG divides by it
    assert not bool(met) and not torch.allclose(flat(plain), x1)
    # positive definite: truncation changes nothing; and per task under vmap
    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    solve = conjugate_gradient(lambda v: unflat(spd @ flat(v), like), unflat(b, like), 2, truncate=True)
    torch.testing.assert_close(flat(solve[0]), torch.linalg.solve(spd, b))
    assert not bool(solve[2])
    both = torch.stack([torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.5])]).double()
    xs, _, negs = torch.func.vmap(lambda v: conjugate_gradient(matvec, {"a": v}, 5, truncate=True))(both)
    torch.testing.assert_close(xs["a"], torch.stack([both[0], x1]))
    assert negs.tolist() == [True, True]


def test_implicit_gradient_is_the_explicit_hessian_solve():
    torch.manual_seed(0)
    model = TinyTanh().double()
    params = {k: v.detach() for k, v in params_of(model).items()}
    task = regression_task(1)
    lam, damping = 1.5, 0.25

    def support_flat(vec):
        return mse(model, unflat(vec, params), task.support_x, task.support_y)

    hessian = torch.autograd.functional.hessian(support_flat, flat(params))  # [13, 13]
    v = torch.randn(13, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for d in (0.0, damping):
        a = (1 + d) * torch.eye(13, dtype=torch.float64) + hessian / lam
        g, residual, _ = implicit_gradient(
            lambda p: mse(model, p, task.support_x, task.support_y),
            params,
            unflat(v, params),
            lam=lam,
            cg_steps=40,
            cg_damping=d,
        )
        torch.testing.assert_close(flat(g), torch.linalg.solve(a, v), rtol=1e-7, atol=1e-9)
        assert float(residual) < 1e-8


# -- the inner solver ---------------------------------------------------------------------------
def test_inner_solver_steps_and_reduces_the_proximal_objective():
    torch.manual_seed(0)
    model = TinyTanh().double()  # smooth: gradient descent with a small step descends monotonically
    learner = IMAML(model, FewShotObjective(model, kind="regression"), inner_lrs=[0.05] * 3, lam=2.0)
    theta = learner.theta()
    task = regression_task(3, k=10)
    path = learner.solve_inner(theta, task, [0.05] * 40, 2.0)
    # the first two steps by hand: the proximal term is 0 at theta, then pulls phi back toward it

    def grad_at(p):
        p = {k: v.clone().requires_grad_() for k, v in p.items()}
        loss = mse(model, p, task.support_x, task.support_y)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

    g0 = grad_at(theta)
    phi1 = {k: theta[k] - 0.05 * g0[k] for k in theta}
    g1 = grad_at(phi1)
    phi2 = {k: phi1[k] - 0.05 * (g1[k] + 2.0 * (phi1[k] - theta[k])) for k in theta}
    for k in theta:
        torch.testing.assert_close(path[0][k], phi1[k])
        torch.testing.assert_close(path[1][k], phi2[k])

    def objective(p):
        return float(proximal_objective(lambda q, _s: mse(model, q, task.support_x, task.support_y), p, theta, 2.0))

    values = [objective(theta)] + [objective(p) for p in path]
    assert values[0] == pytest.approx(float(mse(model, theta, task.support_x, task.support_y)))
    assert all(b < a for a, b in zip(values, values[1:]))  # every step lowers it
    assert values[-1] < 0.5 * values[0]


# Backtracking, by hand: L(w) = c/2 ||w||^2, lam 10, phi_0 = theta = w0. The first step's direction is
# c w0 (the proximal term vanishes at theta); a step of size a gives w0 (1 - a c) and
# F = c/2 ||w0||^2 [(1 - a c)^2 + lam a^2 c], which does not exceed F(w0) iff (1 - a c)^2 + lam a^2 c <= 1.
BACKTRACK_CASES = [
    (50.0, 0.01),  # 0.25 + 0.05 <= 1: lr itself
    (300.0, 0.005),  # lr: 4 + 0.3 > 1; lr/2: 0.25 + 0.075 <= 1
    (700.0, 0.0025),  # lr: 36 + 0.7; lr/2: 6.25 + 0.175; lr/4: 0.5625 + 0.04375 <= 1: lr/4
    (1000.0, 0.0),  # lr: 81 + 1; lr/2: 16 + 0.25; lr/4: 2.25 + 0.0625, all > 1: no step
]


@pytest.mark.parametrize("curvature, size", BACKTRACK_CASES)
def test_backtracking_takes_the_longest_step_that_does_not_raise_the_proximal_objective(curvature, size):
    w0 = torch.tensor([0.3, -1.2], dtype=torch.float64)

    def support(p, _step):
        return 0.5 * curvature * (p["w"] ** 2).sum()

    path = proximal_steps(support, {"w": w0}, lrs=[0.01], lam=10.0, backtrack=2)
    torch.testing.assert_close(path[0]["w"], w0 * (1 - size * curvature), rtol=1e-12, atol=0)
    plain = proximal_steps(support, {"w": w0}, lrs=[0.01], lam=10.0)  # backtrack 0: the plain step
    torch.testing.assert_close(plain[0]["w"], w0 * (1 - 0.01 * curvature), rtol=1e-12, atol=0)


def test_backtracking_chooses_per_task_under_vmap():
    w0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    curvatures = torch.tensor([c for c, _ in BACKTRACK_CASES], dtype=torch.float64)

    def one(c):
        return proximal_steps(
            lambda p, _s: 0.5 * c * (p["w"] ** 2).sum(), {"w": w0}, lrs=[0.01], lam=10.0, backtrack=2
        )[0]["w"]

    expected = torch.stack([w0 * (1 - a * c) for c, a in BACKTRACK_CASES])
    torch.testing.assert_close(torch.func.vmap(one)(curvatures), expected, rtol=1e-12, atol=0)


# -- the Hessian-free ("iMAML, HF") inner solver -------------------------------------------------
# L(w) = 1/2 w^T A w - b^T w with A indefinite (eigenvalues -1, 2, 5) and lam 3, so H + lam I is
# positive definite (2, 5, 8): the proximal solution is (A + lam I)^-1 (b + lam theta).
QUAD_A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 2.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
QUAD_B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic(p, _step):
    w = p["w"]
    return 0.5 * w @ QUAD_A @ w - QUAD_B @ w


@pytest.mark.parametrize("halvings", [0, 3])
def test_hessian_free_step_lands_on_the_proximal_solution_of_a_quadratic(halvings):
    theta = torch.tensor([0.4, -0.7, 1.1], dtype=torch.float64)
    lam = 3.0
    assert torch.linalg.eigvalsh(QUAD_A).min() < 0 < torch.linalg.eigvalsh(QUAD_A + lam * torch.eye(3)).min()
    solution = torch.linalg.solve(QUAD_A + lam * torch.eye(3, dtype=torch.float64), QUAD_B + lam * theta)
    path = newton_steps(quadratic, {"w": theta}, steps=2, lam=lam, cg_steps=3, halvings=halvings)
    torch.testing.assert_close(path[0]["w"], solution, rtol=1e-10, atol=1e-12)  # one step: CG exact in 3 dims
    torch.testing.assert_close(path[1]["w"], solution, rtol=1e-10, atol=1e-12)  # and it stays there
    # one CG step is not the Newton step: it lands elsewhere
    short = newton_steps(quadratic, {"w": theta}, steps=1, lam=lam, cg_steps=1, halvings=0)
    assert (short[0]["w"] - solution).abs().max() > 1e-2


def test_hessian_free_line_search_never_raises_the_objective_and_converges_on_a_tanh_net():
    torch.manual_seed(2)
    model = TinyTanh().double()
    task = regression_task(4, k=10)
    theta = {k: v.detach() for k, v in params_of(model).items()}
    lam = 0.5  # weak: the support loss's own curvature matters

    def support(p, _step):
        return mse(model, p, task.support_x, task.support_y)

    path = newton_steps(support, theta, steps=8, lam=lam, cg_steps=13, halvings=8)  # 13 parameters
    values = [float(proximal_objective(support, p, theta, lam)) for p in [theta, *path]]
    assert all(b <= a for a, b in zip(values, values[1:]))
    phi = {k: v.clone().requires_grad_() for k, v in path[-1].items()}
    g = torch.autograd.grad(proximal_objective(support, phi, theta, lam), list(phi.values()))
    assert torch.cat([x.reshape(-1) for x in g]).norm() < 1e-8  # Newton's fast local convergence
    # eight gradient steps of a stable size are far from it
    gd = proximal_steps(support, theta, lrs=[0.1] * 8, lam=lam)
    phi = {k: v.clone().requires_grad_() for k, v in gd[-1].items()}
    g = torch.autograd.grad(proximal_objective(support, phi, theta, lam), list(phi.values()))
    assert torch.cat([x.reshape(-1) for x in g]).norm() > 1e-3


# -- the implicit meta-gradient against finite differences ---------------------------------------
def test_meta_gradient_of_a_linear_model_is_the_closed_form_proximal_solutions_gradient():
    """Linear regression: phi*(theta) = (2/M A^T A + lam I)^-1 (2/M A^T y + lam theta), A = [X, 1]."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    task = regression_task(4, k=6, q=5, d=3)
    lam = 1.0
    learner = IMAML(model, FewShotObjective(model, kind="regression"), inner_lrs=[0.1] * 400, lam=lam, cg_steps=12)
    theta = learner.theta()
    a = torch.cat([task.support_x, torch.ones(6, 1, dtype=torch.float64)], 1)
    aq = torch.cat([task.query_x, torch.ones(5, 1, dtype=torch.float64)], 1)

    def query_loss_of_theta(t):  # t = [w (3), b (1)]
        phi = torch.linalg.solve(
            2 / 6 * a.T @ a + lam * torch.eye(4, dtype=torch.float64), 2 / 6 * a.T @ task.support_y[:, 0] + lam * t
        )
        return ((aq @ phi - task.query_y[:, 0]) ** 2).mean()

    t0 = torch.cat([theta["weight"].reshape(-1), theta["bias"]])
    eps = 1e-6
    fd = torch.stack(
        [
            (query_loss_of_theta(t0 + eps * e) - query_loss_of_theta(t0 - eps * e)) / (2 * eps)
            for e in torch.eye(4, dtype=torch.float64)
        ]
    )
    g, metrics = learner.task_meta_gradient(theta, task)
    torch.testing.assert_close(torch.cat([g["weight"].reshape(-1), g["bias"]]), fd, rtol=1e-6, atol=1e-9)
    assert float(metrics["cg_residual"]) < 1e-8
    # and it is not the first-order gradient (d phi / d theta = I would be wrong here)
    _, post = learner.task_meta_gradient(theta, task)
    assert float(post["loss_post_adapt"]) < float(post["loss_pre_adapt"])


@pytest.mark.parametrize("solver", ["gd", "hessian_free"])
def test_meta_gradient_of_a_tanh_net_matches_finite_differences_of_the_proximal_solution(solver):
    torch.manual_seed(1)
    model = TinyTanh().double()
    task = regression_task(5, k=8, q=6)
    lam, lr, steps = 4.0, 0.2, 50  # contracts the error by about 1 - lr * lam = 0.2 a step
    objective = FewShotObjective(model, kind="regression")
    inner = [lr] * steps if solver == "gd" else [lr] * 6  # Newton: 6 steps of 40 CG iterations
    backtrack = 0 if solver == "gd" else 4
    learner = IMAML(model, objective, inner_lrs=inner, lam=lam, cg_steps=40, inner_solver=solver, backtrack=backtrack)
    theta = learner.theta()

    def solve(t_vec):  # the test's own proximal gradient descent on flat parameters
        phi = t_vec.clone()
        for _ in range(steps):
            phi = phi.detach().requires_grad_()
            loss = mse(model, unflat(phi, theta), task.support_x, task.support_y) + lam / 2 * ((phi - t_vec) ** 2).sum()
            (g,) = torch.autograd.grad(loss, phi)
            phi = phi - lr * g
        return phi.detach()

    def query_loss(t_vec):
        return mse(model, unflat(solve(t_vec), theta), task.query_x, task.query_y)

    t0, eps = flat(theta), 1e-5
    fd = torch.stack(
        [(query_loss(t0 + eps * e) - query_loss(t0 - eps * e)) / (2 * eps) for e in torch.eye(13, dtype=torch.float64)]
    )
    g, _ = learner.task_meta_gradient(theta, task)
    torch.testing.assert_close(flat(g), fd, rtol=1e-5, atol=1e-8)
    # the first-order approximation (the query gradient itself) is measurably different
    phi = unflat(solve(t0), theta)
    phi = {k: v.requires_grad_() for k, v in phi.items()}
    first_order = torch.autograd.grad(mse(model, phi, task.query_x, task.query_y), list(phi.values()))
    assert (torch.cat([x.reshape(-1) for x in first_order]) - fd).abs().max() > 1e-3


# -- the meta-update ----------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_step_is_adam_on_the_mean_of_the_tasks_implicit_gradients(batched):
    torch.manual_seed(0)
    model = TinyTanh().double()
    lam, lr, steps = 2.0, 0.05, 5
    learner = IMAML(
        model,
        FewShotObjective(model, kind="regression"),
        inner_lrs=[lr] * steps,
        lam=lam,
        cg_steps=40,
        outer_lr=1e-2,
        batched=batched,
    )
    theta = {k: v.clone() for k, v in learner.theta().items()}  # step updates the model in place
    tasks = [regression_task(s) for s in (7, 8)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    reference = []
    for t in tasks:  # by hand: proximal steps, explicit Hessian, solve
        phi = flat(theta)
        for _ in range(steps):
            phi = phi.detach().requires_grad_()
            (g,) = torch.autograd.grad(mse(model, unflat(phi, theta), t.support_x, t.support_y), phi)
            phi = phi - lr * (g + lam * (phi - flat(theta)))
        phi = phi.detach()
        h = torch.autograd.functional.hessian(
            lambda v, t=t: mse(model, unflat(v, theta), t.support_x, t.support_y), phi
        )
        p = phi.clone().requires_grad_()
        (vq,) = torch.autograd.grad(mse(model, unflat(p, theta), t.query_x, t.query_y), p)
        reference.append(torch.linalg.solve(torch.eye(13, dtype=torch.float64) + h / lam, vq))
    metrics = learner.step(batch, 0)
    grads = torch.cat([p.grad.reshape(-1) for p in params_of(model).values()])
    torch.testing.assert_close(grads, torch.stack(reference).mean(0), rtol=1e-7, atol=1e-10)
    moved = flat(learner.theta()) - flat(theta)  # Adam's first step: lr x sign of the gradient
    torch.testing.assert_close(moved, -1e-2 * torch.sign(grads), rtol=1e-4, atol=1e-7)
    assert set(metrics) >= {"loss_pre_adapt", "loss_post_adapt", "cg_residual", "prox_distance"}


# -- runs ---------------------------------------------------------------------------------------
def test_sinusoid_run_trains_and_evaluates(tmp_path, capsys):
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/sinusoid/imaml.yaml", "--run-dir", str(run), "--no-progress",
            "num_iterations=20", "eval.every=0", "checkpoint_every=20"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "50"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "mse" and result["steps"] == list(range(11))
    assert result["mean"][10] < result["mean"][0]  # the proximal solution lowers the query MSE
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["train/loss_post_adapt"] for r in rows]) < np.mean([r["train/loss_pre_adapt"] for r in rows])
    assert np.median([r["train/cg_residual"] for r in rows]) < 0.1  # CG converges at the proximal solution
    capsys.readouterr()
    bad = ["train", "experiments/sinusoid/imaml.yaml", "inner.batch_size=5", "--run-dir", str(tmp_path / "b")]
    assert main(bad) == 2
    assert "inner.batch_size: imaml solves the proximal problem of the whole support set" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_omniglot_run_trains_evaluates_and_classifies(tmp_path):
    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/imaml_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=5", "meta_batch_size=4",
            "inner.steps=3", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "20", "--steps", "3"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0, 1, 2, 3]
    assert result["mean"][3] > result["mean"][0]  # the proximal steps adapt
    clf = FewShotClassifier.from_run(run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert clf.learner.optimizer.state_dict()["state"][0]["step"] == state["learner"]["optimizer"]["state"][0]["step"]
    images = list(np.random.default_rng(0).random((5, 28, 28)))
    adapted = clf.adapt(images, list("abcde"), steps=10)
    assert list(adapted.predict(images)) == list("abcde")  # ten proximal steps fit the support set
