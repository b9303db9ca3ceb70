"""iMAML (Rajeswaran, Finn, Kakade and Levine, 2019): MAML with implicit meta-gradients of a proximal inner problem.

The inner problem of task i is regularised toward the meta-parameters,

    phi_i*(theta) = argmin_phi  L_support(phi) + (lambda / 2) ||phi - theta||^2

and solved approximately from ``phi = theta`` by ``inner.steps`` steps of one of the paper's two
inner solvers (``imaml.inner_solver``). "iMAML, GD" (``gd``) takes gradient steps,

    phi <- phi - lr * (grad L_support(phi) + lambda (phi - theta))

and "iMAML, Hessian-free" (``hessian_free``) takes Newton steps: each solves
``(H + lambda I) d = grad F(phi)`` (``F`` the proximal objective, ``H`` the support Hessian at
``phi``) by ``imaml.cg_steps`` iterations of truncated conjugate gradient on Hessian-vector
products, then line-searches ``phi - d, phi - d / 2, ...`` (``imaml.backtrack`` halvings) for the
longest step that does not raise ``F``.

At the solution, ``grad L_support(phi*) + lambda (phi* - theta) = 0``; implicit differentiation
of that stationarity condition gives ``d phi* / d theta = (I + H / lambda)^-1`` with ``H`` the
Hessian of the support loss at ``phi*``. The task's meta-gradient is therefore

    g_i = (I + H_i / lambda)^-1 grad_phi L_query(phi_i)        (the paper's equation 6)

obtained by ``imaml.cg_steps`` iterations of conjugate gradient (the paper uses 5) on
Hessian-vector products of ``torch.func`` (reverse over reverse: ``vjp`` of ``grad`` of the
support loss, built once per task and reused by every CG iteration). Nothing is backpropagated
through the inner loop, so memory does not grow with the inner steps. Then

    theta <- Adam(theta, mean_i g_i)

Paper settings (Omniglot, its Table 2): lambda = 2.0 and 5 CG steps for every setting; 16
inner gradient steps for 5-way and 25 for 20-way tasks. The authors' code (imaml_dev) differs
from the paper's equations: its CG matrix is ``(1 + cg_damping) I + H / (lambda + 10)``, its
training inner loop takes plain gradient steps followed by one proximal pull-back step, and its
test-time adaptation is plain gradient descent (``lam 0``). Here the paper's matrix is the default
(``imaml.cg_damping`` adds ``cg_damping * I`` when asked), training solves the proximal problem,
and evaluation takes the same proximal steps (``imaml.eval_lam``, by default ``imaml.lam``; 0
gives the authors' plain fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, vjp

from agents.maml import means
from metarl.core.functional import Params, inner_lrs, params_of
from metarl.core.learner import Learner, register
from metarl.core.metalearning import map_tasks

MatVec = Callable[[Params], Params]


# -- conjugate gradient on parameter dicts --------------------------------------------------------
def tree_dot(a: Params, b: Params) -> torch.Tensor:
    """The inner product of two parameter dicts seen as one flat vector (a scalar tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(
    matvec: MatVec, b: Params, steps: int, *, truncate: bool = False
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Approximate ``x = A^-1 b`` by ``steps`` conjugate-gradient iterations from ``x = 0``.

    ``A`` is given by ``matvec(v) = A v`` on parameter dicts (symmetric; positive definite for
    the usual convergence guarantee). The number of iterations is fixed, so it runs under
    ``vmap``; an iteration whose direction has ``p^T A p = 0`` (the residual already 0) leaves
    ``x`` unchanged.

    ``truncate``: stop at the first direction of negative curvature (``p^T A p < 0``, where ``A``
    is indefinite), as truncated-Newton CG does (Nocedal & Wright, Algorithm 7.2): ``x`` keeps the
    iterate reached, and is ``b`` itself if the first direction already has negative curvature
    (``A`` taken as ``I``). Without it CG divides by the negative curvature and may return a
    direction of any size and sign.

    Returns ``x``, the relative residual ``||b - A x|| / ||b||`` of the recursion (a scalar tensor)
    and whether negative curvature was met (a boolean scalar tensor).
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = tree_dot(r, r)
    b_norm = rs.sqrt()
    stopped = torch.zeros_like(rs, dtype=torch.bool)
    negative = torch.zeros_like(rs, dtype=torch.bool)
    for i in range(steps):
        ap = matvec(p)
        pap = tree_dot(p, ap)
        ok = pap > 0 if truncate else pap != 0
        if truncate:
            met = ~stopped & (pap < 0)
            negative = negative | met
            if i == 0:  # x = b, its residual b - A b
                x = {k: torch.where(met, b[k], x[k]) for k in x}
                r = {k: torch.where(met, b[k] - ap[k], r[k]) for k in r}
            stopped = stopped | met
            ok = ok & ~stopped
        alpha = torch.where(ok, rs / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = tree_dot(r, r)
        ok = rs != 0
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = {k: r[k] + beta * p[k] for k in r}
        rs = rs_new
    return x, rs.sqrt() / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)), negative


# -- the inner problem ------------------------------------------------------------------------
def proximal_steps(
    support_loss: Callable[[Params, int], torch.Tensor],
    theta: Params,
    *,
    lrs: Sequence[float],
    lam: float,
    backtrack: int = 0,
) -> list[Params]:
    """The iterates ``[phi_1, ..., phi_S]`` of gradient descent on ``F(phi) = L_support(phi) +
    (lam / 2) ||phi - theta||^2`` from ``phi_0 = theta``, one step per learning rate (detached:
    the meta-gradient is implicit, nothing is differentiated through these steps).

    With ``backtrack = J > 0`` step ``s`` takes the longest of ``lr_s, lr_s / 2, ..., lr_s / 2^J``
    that does not increase ``F``, and no step if none does (so ``F`` never rises): all ``J + 1``
    candidates are evaluated and one is selected by a mask, so it runs under ``vmap``.
    """
    theta = {k: v.detach() for k, v in theta.items()}
    phi, path = theta, []
    for step, lr in enumerate(lrs):
        g = grad(support_loss)(phi, step)
        direction = {k: g[k] + lam * (phi[k] - theta[k]) for k in phi}
        size: float | torch.Tensor = lr
        if backtrack:
            size = _backtracked_size(support_loss, step, phi, theta, direction, lr=lr, lam=lam, halvings=backtrack)
        phi = {k: (phi[k] - size * direction[k]).detach() for k in phi}
        path.append(phi)
    return path


def newton_steps(
    support_loss: Callable[[Params, int], torch.Tensor],
    theta: Params,
    *,
    steps: int,
    lam: float,
    cg_steps: int,
    halvings: int,
) -> list[Params]:
    """The iterates ``[phi_1, ..., phi_S]`` of the paper's Hessian-free inner solver on ``F(phi) =
    L_support(phi) + (lam / 2) ||phi - theta||^2`` from ``phi_0 = theta`` (detached, as
    :func:`proximal_steps`'s).

    Step ``s``: ``d ~= (H + lam I)^-1 grad F(phi)`` by ``cg_steps`` iterations of truncated CG
    (:func:`conjugate_gradient`; ``H`` the Hessian of the support loss at ``phi``, by
    Hessian-vector products; stopped at negative curvature, so ``d`` is a descent direction, ``d =
    grad F`` if the first CG direction already has it), then the longest of ``d, d / 2, ..., d /
    2^halvings`` that does not increase ``F``, no step if none does (``halvings = 0``: the full
    step ``d`` always). On a quadratic support loss with ``cg_steps`` at least the number of
    parameters, one step lands on the proximal solution.
    """
    theta = {k: v.detach() for k, v in theta.items()}
    phi, path = theta, []
    for step in range(steps):

        def objective(p: Params, step: int = step) -> torch.Tensor:
            return proximal_objective(support_loss, p, theta, lam, step=step)

        g, hvp = vjp(grad(objective), phi)  # hvp(v) = ((H + lam I) v,): F's Hessian is symmetric
        direction, _, _ = conjugate_gradient(lambda v, hvp=hvp: hvp(v)[0], g, cg_steps, truncate=True)
        size: float | torch.Tensor = 1.0
        if halvings:
            size = _backtracked_size(support_loss, step, phi, theta, direction, lr=1.0, lam=lam, halvings=halvings)
        phi = {k: (phi[k] - size * direction[k]).detach() for k in phi}
        path.append(phi)
    return path


def _backtracked_size(
    support_loss: Callable[[Params, int], torch.Tensor],
    step: int,
    phi: Params,
    theta: Params,
    direction: Params,
    *,
    lr: float,
    lam: float,
    halvings: int,
) -> torch.Tensor:
    """The longest step size of ``lr * 2^-j``, ``j = 0..halvings``, along ``-direction`` that does not
    increase the proximal objective at ``phi``, 0 if none: a 0-dim tensor. (Taking the shortest
    step when none was fine let one sinusoid task's F climb 0.34 -> 2.6 -> 22 -> ... -> inf over
    its 10 steps at iteration 10,380 of a 2026-12-01 run.)"""

    def objective(p: Params) -> torch.Tensor:
        return proximal_objective(support_loss, p, theta, lam, step=step)

    ref = next(iter(phi.values()))
    sizes = lr * 0.5 ** torch.arange(halvings + 1, dtype=ref.dtype, device=ref.device)
    start = objective(phi)
    values = torch.stack([objective({k: phi[k] - sizes[j] * direction[k] for k in phi}) for j in range(halvings + 1)])
    fine = values <= start  # NaN compares False
    first = fine & (fine.int().cumsum(0) == 1)  # the first True; none when no size is fine
    return (sizes * first).sum()


def proximal_objective(
    support_loss: Callable[[Params, int], torch.Tensor], phi: Params, theta: Params, lam: float, *, step: int = 0
) -> torch.Tensor:
    """``L_support(phi) + (lam / 2) ||phi - theta||^2``, the inner problem's objective (a scalar), with the
    support loss of inner step ``step``."""
    diff = {k: phi[k] - theta[k] for k in phi}
    return support_loss(phi, step) + 0.5 * lam * tree_dot(diff, diff)


def implicit_gradient(
    support_loss: Callable[[Params], torch.Tensor],
    phi: Params,
    query_grad: Params,
    *,
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    cg_truncate: bool = False,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """``(I + H / lam + cg_damping I)^-1 query_grad`` by conjugate gradient, with ``H`` the Hessian
    of ``support_loss`` at ``phi`` (Hessian-vector products: ``torch.func.vjp`` of ``grad``);
    ``cg_truncate``: stop at negative curvature (:func:`conjugate_gradient`). Returns the
    meta-gradient (a dict shaped like ``phi``), CG's relative residual and whether it met
    negative curvature."""
    _, hvp = vjp(grad(support_loss), phi)

    def matvec(v: Params) -> Params:
        (hv,) = hvp(v)
        return {k: (1.0 + cg_damping) * v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(matvec, query_grad, cg_steps, truncate=cg_truncate)


class IMAML(Learner):
    """Implicit MAML: proximal gradient-descent inner loop, CG implicit meta-gradient, Adam outer step.

    Args:
        model: the meta-model (``theta``; updated in place by :meth:`step`).
        objective: a per-task few-shot objective (:class:`metarl.fewshot.objective.FewShotObjective`:
            ``support_loss(params, task, step)`` and ``query_metrics(params, task)``).
        inner_lrs: learning rate of each inner (proximal) gradient step in training.
        lam: the proximal regularisation strength ``lambda``.
        cg_steps: conjugate-gradient iterations per task.
        cg_damping: extra ``cg_damping * I`` in the CG matrix (0: the paper's ``I + H / lambda``).
        cg_truncate: stop CG at negative curvature (see :func:`conjugate_gradient`; False: the paper's
            plain CG).
        eval_lam: ``lambda`` of the proximal steps at evaluation and prediction (None: ``lam``).
        backtrack: halvings of each inner step size tried so that the proximal objective does not
            increase (0: plain steps, as the paper; see :func:`proximal_steps`); with the
            Hessian-free solver, of its Newton step (see :func:`newton_steps`).
        inner_solver: ``"gd"`` (gradient steps of ``inner_lrs``, "iMAML, GD") or ``"hessian_free"``
            (``len(inner_lrs)`` Newton-CG steps of ``cg_steps`` CG iterations each, whose sizes
            are 1 and its halvings: the learning rates themselves are unused; "iMAML, HF").
        outer_lr: Adam learning rate.
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    first_order = True  # Learner.adapt: nothing is differentiated through the inner loop

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        inner_lrs: Sequence[float],
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        cg_truncate: bool = False,
        eval_lam: float | None = None,
        backtrack: int = 0,
        inner_solver: str = "gd",
        outer_lr: float = 1e-3,
        batched: bool = True,
    ) -> None:
        if lam <= 0:
            raise ValueError(f"imaml lam must be > 0 (the proximal term's strength), got {lam}")
        if cg_steps < 1:
            raise ValueError(f"imaml cg_steps must be >= 1, got {cg_steps}")
        if inner_solver not in ("gd", "hessian_free"):
            raise ValueError(f"imaml inner_solver must be 'gd' or 'hessian_free', got {inner_solver!r}")
        self.model = model
        self.objective = objective
        self.inner_lrs = list(inner_lrs)
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.cg_truncate = bool(cg_truncate)
        self.eval_lam = self.lam if eval_lam is None else float(eval_lam)
        self.backtrack = backtrack
        self.inner_solver = inner_solver
        self.batched = batched
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr)

    # -- one task -----------------------------------------------------------------------------
    def solve_inner(self, theta: Params, task: Any, lrs: Sequence[float], lam: float) -> list[Params]:
        """The inner iterates of one task (see :func:`proximal_steps` and :func:`newton_steps`)."""

        def support(p: Params, step: int) -> torch.Tensor:
            return self.objective.support_loss(p, task, step)

        if self.inner_solver == "hessian_free":
            steps, halvings = len(lrs), self.backtrack
            return newton_steps(support, theta, steps=steps, lam=lam, cg_steps=self.cg_steps, halvings=halvings)
        return proximal_steps(support, theta, lrs=lrs, lam=lam, backtrack=self.backtrack)

    def task_meta_gradient(self, theta: Params, task: Any) -> tuple[Params, dict[str, torch.Tensor]]:
        """One task's implicit meta-gradient ``g`` (shaped like ``theta``) and its metrics:
        query metrics before / after adaptation, CG's relative residual and ``||phi - theta||``."""
        pre = self.objective.query_metrics(theta, task)
        path = self.solve_inner(theta, task, self.inner_lrs, self.lam)
        phi = path[-1] if path else theta

        def query_loss(p: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            metrics = self.objective.query_metrics(p, task)
            return metrics["loss"], metrics

        query_grad, post = grad(query_loss, has_aux=True)(phi)
        g, residual, negative = implicit_gradient(
            lambda p: self.objective.support_loss(p, task, 0),
            phi,
            query_grad,
            lam=self.lam,
            cg_steps=self.cg_steps,
            cg_damping=self.cg_damping,
            cg_truncate=self.cg_truncate,
        )
        diff = {k: phi[k] - theta[k] for k in phi}
        metrics = {f"{k}_pre_adapt": v.detach() for k, v in pre.items()}
        metrics.update({f"{k}_post_adapt": v.detach() for k, v in post.items()})
        metrics["cg_residual"] = residual.detach()
        metrics["cg_negative_curvature"] = negative.to(residual.dtype)
        metrics["prox_distance"] = tree_dot(diff, diff).sqrt().detach()
        return {k: v.detach() for k, v in g.items()}, metrics

    # -- the learner interface ----------------------------------------------------------------
    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        grads, metrics = map_tasks(self.task_meta_gradient, self.theta(), batch, batched=self.batched)
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in params_of(self.model).items():
            p.grad = grads[name].mean(0)
        self.optimizer.step()
        return means(metrics)

    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Query metrics after 0, 1, ..., ``len(lrs)`` proximal steps (``eval_lam``): ``[T, len(lrs) + 1]``."""

        def curve(theta: Params, task: Any) -> dict[str, torch.Tensor]:
            path = [theta, *self.solve_inner(theta, task, lrs, self.eval_lam)]
            rows = [self.objective.query_metrics(p, task) for p in path]
            return {k: torch.stack([r[k].detach() for r in rows]) for k in rows[0]}

        return map_tasks(curve, self.theta(), tasks, batched=self.batched)

    def adapt_task(self, task: Any, lrs: Sequence[float]) -> Params:
        """Parameters after ``len(lrs)`` proximal steps (``eval_lam``) on one task's support set."""
        theta = self.theta()
        path = self.solve_inner(theta, task, lrs, self.eval_lam)
        return path[-1] if path else theta

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


@register("imaml", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> IMAML:
    c = cfg.imaml
    return IMAML(
        model,
        objective,
        inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps),
        lam=c.lam,
        cg_steps=c.cg_steps,
        cg_damping=c.cg_damping,
        cg_truncate=c.cg_truncate,
        eval_lam=c.eval_lam,
        backtrack=c.backtrack,
        inner_solver=c.inner_solver,
        outer_lr=cfg.outer.lr,
        batched=cfg.batched,
    )
