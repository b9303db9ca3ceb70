"""MAML++ (Antoniou et al., 2019, How to train your MAML): MAML with five of the paper's fixes.

With ``S`` inner steps, inner step ``s = 0..S-1`` of task ``i`` uses its own learning rate per
parameter tensor (LSLR) and its own batch-norm scale and bias ``gamma_s, beta_s`` (BNWB):

    phi_0 = theta
    phi_{s+1}[n] = phi_s[n] - alpha_s[n] * grad_n L_support(phi_s, gamma_s, beta_s; task i)     (n: each tensor)
    L_meta = mean_i sum_s w_s(t) * L_query(phi_{s+1}, gamma_s, beta_s; task i)                 (multi-step loss)
    (theta, alpha, gamma, beta) <- Adam(grad L_meta), outer lr cosine-annealed over the run

* Multi-step loss (MSL): ``w(t)`` starts uniform (``1/S`` each) and moves linearly toward the last
  step: every earlier weight loses ``t / (S T)`` down to a floor of ``MSL_FLOOR / S``, the last
  gains what they lose (the weights sum to 1); from iteration ``T = msl_iterations`` on only the
  last step's query loss counts, as in MAML (:meth:`MAMLPlusPlus.msl_weights`).
* Derivative-order annealing (DA): first-order meta-gradients (FOMAML's) for the first
  ``first_order_iterations`` iterations, second order (MAML's) after.
* LSLR: ``alpha_s[n]`` is meta-learned, initialised to ``inner.lr`` (of step ``s``), and kept
  non-negative: after each Adam step a rate below zero is set to zero (a projection). The paper does
  not constrain the rates; unconstrained, on sinusoid (rates 0.01, Adam 1e-3: a tenth of a rate per
  step) bias rates went negative within 100 iterations, the inner loop climbed the support loss,
  and a gradient spike stalled Adam until the run went NaN at iteration 9.3k. A zero rate still
  lets a step leave a tensor unadapted.
* BNWB: the batch-norm weights and biases of the model are replaced by one set per step, meta-learned
  and not adapted in the inner loop; the query loss after step ``s + 1`` uses step ``s``'s set and
  the loss before adaptation step 0's. The paper's per-step running statistics (BNRS) do not apply:
  our batch norm always normalises with the batch's own statistics (no running statistics).
* Cosine annealing of the outer (Adam) learning rate from ``outer.lr`` to ``min_outer_lr`` over
  ``num_iterations`` (``torch.optim.lr_scheduler.CosineAnnealingLR``, checkpointed; a run resumed
  with a larger ``num_iterations`` continues on the cosine of the new length).

Evaluation and prediction (``adaptation_curve``, ``adapt_task``, ``task_outputs``) adapt with the
learned per-step learning rates and batch-norm sets, whatever ``eval.lr`` would say (it must be
unset); steps beyond the ``S`` trained ones reuse the last step's learning rates and batch-norm set.
For a model without batch norm (the sinusoid MLP) BNWB does not apply. The learned rates and
batch-norm sets are a module of the learner (on the model's device), checkpointed with its state.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from agents.maml import MAML, means
from agents.models import BatchStatNorm2d
from metarl.core.functional import Params, adapt, inner_lrs, params_of
from metarl.core.learner import register
from metarl.core.metalearning import map_tasks

#: Multi-step loss: an earlier step's weight never falls below MSL_FLOOR / S while the weights are annealed.
MSL_FLOOR = 0.03


def norm_names(model: nn.Module) -> list[str]:
    """Names of the batch-norm scale and bias parameters of ``model`` (empty for a model without batch norm)."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, BatchStatNorm2d)):
            names += [name for name, p in m.named_parameters(prefix=prefix, recurse=False) if p.requires_grad]
    return names


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots)."""
    return name.replace(".", "/")


class MAMLPlusPlus(MAML):
    """MAML++: multi-step loss, derivative-order annealing, LSLR, per-step batch norm, cosine outer lr.

    Args:
        model: the meta-model (its batch-norm parameters are superseded by the per-step sets).
        objective: a per-task few-shot objective (``support_loss``, ``query_metrics``).
        inner_lrs: initial inner learning rate of each of the ``S`` training steps.
        outer_lr, min_outer_lr: Adam's learning rate, cosine-annealed from the first to the second
            over ``num_iterations``.
        msl_iterations: iterations over which the multi-step loss weights move to the last step.
        first_order_iterations: iterations with first-order meta-gradients (second order after).
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        inner_lrs: Sequence[float],
        outer_lr: float = 1e-3,
        min_outer_lr: float = 1e-5,
        num_iterations: int,
        msl_iterations: int,
        first_order_iterations: int,
        batched: bool = True,
    ) -> None:
        super().__init__(model, objective, inner_lrs=inner_lrs, outer_lr=None, batched=batched)
        if not hasattr(self.objective, "objective"):
            raise ValueError("MAML++ needs a per-task few-shot objective (support_loss, query_metrics)")
        if not self.inner_lrs:
            raise ValueError("MAML++ needs at least one inner step; got no inner learning rates")
        self.task_objective = self.objective.objective
        self.num_steps = len(self.inner_lrs)
        self.msl_iterations = msl_iterations
        self.first_order_iterations = first_order_iterations
        theta = params_of(model)
        self.norms = norm_names(model)
        self.adapted = [name for name in theta if name not in self.norms]
        ref = theta[self.adapted[0]]
        steps = self.num_steps
        self.modules = nn.Module()
        self.modules.lrs = nn.ParameterDict(
            {
                _key(n): nn.Parameter(torch.tensor(self.inner_lrs, dtype=ref.dtype, device=ref.device))
                for n in self.adapted
            }
        )  # alpha [S] per adapted tensor
        self.modules.norms = nn.ParameterDict(
            {_key(n): nn.Parameter(theta[n].detach().clone().unsqueeze(0).repeat(steps, 1)) for n in self.norms}
        )  # gamma / beta [S, C] per batch-norm tensor
        self.optimizer = torch.optim.Adam([*(theta[n] for n in self.adapted), *self.modules.parameters()], lr=outer_lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=num_iterations, eta_min=min_outer_lr
        )

    # -- the schedules --------------------------------------------------------------------------
    def msl_weights(self, iteration: int) -> list[float]:
        """Weights ``[S]`` of the query losses after steps 1..S at ``iteration`` (they sum to 1)."""
        s = self.num_steps
        if s == 1 or iteration >= self.msl_iterations:
            return [0.0] * (s - 1) + [1.0]
        early = max(1.0 / s - iteration / (s * self.msl_iterations), MSL_FLOOR / s)
        return [early] * (s - 1) + [1.0 - (s - 1) * early]

    def first_order_at(self, iteration: int) -> bool:
        """Whether the meta-gradient of ``iteration`` is first order (derivative-order annealing)."""
        return iteration < self.first_order_iterations

    def step_settings(self, step: int) -> tuple[dict[str, torch.Tensor], Params]:
        """Inner step ``step``'s learning rates ``{name: 0-dim}`` and batch-norm parameters
        ``{name: [C]}``; a step past the trained ones uses the last trained step's."""
        s = min(step, self.num_steps - 1)
        lrs = {n: self.modules.lrs[_key(n)][s] for n in self.adapted}
        return lrs, {n: self.modules.norms[_key(n)][s] for n in self.norms}

    # -- one task ----------------------------------------------------------------------------------
    def unroll(
        self, theta: Params, task: Any, steps: int, *, first_order: bool, scored: Collection[int]
    ) -> tuple[Params, list[dict[str, torch.Tensor]]]:
        """``steps`` inner steps on one task from ``theta``: the adapted parameters (with the batch-norm
        set of the last step taken) and the query metrics after each number of steps in ``scored``
        (0 = before adaptation), in increasing order."""
        objective = self.task_objective
        phi = {n: theta[n] for n in self.adapted}
        _, norms = self.step_settings(0)
        rows = [objective.query_metrics({**phi, **norms}, task)] if 0 in scored else []
        for s in range(steps):
            lrs, norms = self.step_settings(s)

            def support(p: Params, _i: int, norms: Params = norms, s: int = s) -> torch.Tensor:
                return objective.support_loss({**p, **norms}, task, s)

            phi = adapt(support, phi, lrs=[lrs], first_order=first_order)
            if s + 1 in scored:
                rows.append(objective.query_metrics({**phi, **norms}, task))
        return {**phi, **norms}, rows

    # -- training ----------------------------------------------------------------------------------
    def meta_loss(self, params: Params, batch: Any, iteration: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The multi-step meta-loss of ``iteration`` (mean over tasks), differentiable in ``params`` and
        the learner's modules; per-task metrics before and after the ``S`` steps (detached)."""
        weights = self.msl_weights(iteration)
        scored = [s + 1 for s, w in enumerate(weights) if w > 0]
        first_order = self.first_order_at(iteration)

        def one(p: Params, task: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad():
                _, norms = self.step_settings(0)
                pre = self.task_objective.query_metrics({**{k: v.detach() for k, v in p.items()}, **norms}, task)
            _, rows = self.unroll(p, task, self.num_steps, first_order=first_order, scored=scored)
            loss = sum(weights[s - 1] * row["loss"] for s, row in zip(scored, rows))
            metrics = {f"{k}_pre_adapt": v for k, v in pre.items()}
            metrics.update({f"{k}_post_adapt": v.detach() for k, v in rows[-1].items()})
            return loss, metrics

        losses, metrics = map_tasks(one, params, batch, batched=self.batched)
        return losses.mean(), metrics

    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.meta_loss(params_of(self.model), batch, iteration)
        loss.backward()
        outer_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for rates in self.modules.lrs.values():
                rates.clamp_(min=0.0)  # LSLR rates stay step sizes (see the module docstring)
            mean_lr = torch.stack([a.mean() for a in self.modules.lrs.values()]).mean()
        return {
            **means(metrics),
            "outer_lr": outer_lr,
            "first_order": float(self.first_order_at(iteration)),
            "inner_lr_mean": float(mean_lr),
        }

    # -- evaluation and prediction ---------------------------------------------------------------
    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Query metrics after 0..len(lrs) steps with the learned rates and batch-norm sets
        (``lrs`` gives only the number of steps): ``{name: [T, len(lrs) + 1]}``."""
        steps = len(lrs)

        def curve(p: Params, task: Any) -> dict[str, torch.Tensor]:
            _, rows = self.unroll(p, task, steps, first_order=True, scored=range(steps + 1))
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        with torch.no_grad():
            return map_tasks(curve, self.theta(), tasks, batched=self.batched)

    def adapt_task(self, task: Any, lrs: Sequence[float]) -> Params:
        """The parameters after ``len(lrs)`` learned steps on one task, with the batch-norm set of the
        last step (of step 0 for no steps), as :meth:`task_outputs` calls the model with."""
        with torch.no_grad():
            adapted, _ = self.unroll(self.theta(), task, len(lrs), first_order=True, scored=())
        return adapted

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "modules": self.modules.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "modules" in state:
            self.modules.load_state_dict(state["modules"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            num_iterations = self.scheduler.T_max
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scheduler.T_max != num_iterations:  # a run resumed with a new num_iterations: anneal over it
                self.scheduler.T_max = num_iterations
                t, low = self.scheduler.last_epoch, self.scheduler.eta_min
                for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                    group["lr"] = low + (base - low) * (1 + math.cos(math.pi * t / num_iterations)) / 2


@register("mamlpp", family="fewshot")
def build_mamlpp(cfg: Any, model: nn.Module, objective: Any) -> MAMLPlusPlus:
    return MAMLPlusPlus(
        model,
        objective,
        inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps),
        outer_lr=cfg.outer.lr,
        min_outer_lr=cfg.mamlpp.min_outer_lr,
        num_iterations=cfg.num_iterations,
        msl_iterations=cfg.mamlpp.msl_iterations,
        first_order_iterations=cfg.mamlpp.first_order_iterations,
        batched=cfg.batched,
    )
