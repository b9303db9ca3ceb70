"""Meta-learners over a generic "task -> support loss, query loss" interface.

The same classes serve the supervised few-shot family and the policy meta-learners: a task
family only supplies a :class:`MetaObjective`, i.e. how to compute a task's support loss (the
inner-loop objective) and its query metrics (the outer objective) for a given parameter dict.

- :class:`MAML`: second-order meta-gradient through the inner loop, outer step with Adam.
- :class:`FOMAML`: the same with the first-order inner loop.
- :class:`Reptile`: k first-order inner steps, then ``theta <- theta + eps * mean(phi - theta)``.
- :class:`Pretrain`: the multi-task baseline: no inner loop in training, plain Adam on the
  query loss of every task at ``theta``; evaluated with the same fine-tuning inner loop.

A meta-batch ``tasks`` is a pytree of tensors (e.g. a NamedTuple) whose leaves are stacked
along a leading task dimension ``T``. With ``batched=True`` the per-task work runs under
``torch.func.vmap`` over that dimension; otherwise it loops over tasks (same math, the fallback
for models or objectives that vmap cannot handle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from metarl.core.functional import Params, adapt, params_of


class MetaObjective(Protocol):
    """Losses of one task; ``task`` is that task's slice of the meta-batch pytree."""

    def support_loss(self, params: Params, task: Any, step: int) -> torch.Tensor:
        """Scalar inner-loop loss of ``params`` at inner step ``step``."""
        ...

    def query_metrics(self, params: Params, task: Any) -> dict[str, torch.Tensor]:
        """Scalar query metrics of ``params``; must contain ``"loss"`` (the outer objective)."""
        ...


def num_tasks(tasks: Any) -> int:
    """Size of the leading task dimension of a meta-batch pytree."""
    sizes = {leaf.shape[0] for leaf in torch.utils._pytree.tree_leaves(tasks)}
    if len(sizes) != 1:
        raise ValueError(f"meta-batch leaves disagree on the number of tasks: {sorted(sizes)}")
    return sizes.pop()


def map_tasks(fn: Callable[[Params, Any], Any], params: Params, tasks: Any, *, batched: bool) -> Any:
    """``fn(params, task)`` for every task, outputs stacked along a new leading dimension."""
    if batched:
        return vmap(fn, in_dims=(None, 0), randomness="different")(params, tasks)
    outs = [fn(params, tree_map(lambda x, i=i: x[i], tasks)) for i in range(num_tasks(tasks))]
    return tree_map(lambda *xs: torch.stack(xs), *outs)


def linear_anneal(start: float, end: float, iteration: int, num_iterations: int) -> float:
    """``start`` at iteration 0, ``end`` from ``num_iterations`` on, linear in between (Reptile's epsilon)."""
    frac = min(iteration / max(num_iterations, 1), 1.0)
    return start + frac * (end - start)


class MetaLearner:
    """Shared machinery: the inner loop of a task and adaptation curves for evaluation."""

    def __init__(
        self,
        model: nn.Module,
        objective: MetaObjective,
        *,
        inner_lrs: Sequence[float],
        first_order: bool,
        batched: bool = True,
    ) -> None:
        self.model = model
        self.objective = objective
        self.inner_lrs = list(inner_lrs)
        self.first_order = first_order
        self.batched = batched

    def adapt(self, params: Params, task: Any, lrs: Sequence[float] | None = None) -> Params:
        """Adapted parameters of one task (new dict; the model is untouched)."""
        lrs = self.inner_lrs if lrs is None else lrs

        def support(p: Params, step: int) -> torch.Tensor:
            return self.objective.support_loss(p, task, step)

        return adapt(support, params, lrs=lrs, first_order=self.first_order)

    def _adapt_scored(self, params: Params, task: Any) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
        """One task: adapted parameters, the post-adaptation query loss (differentiable in
        ``params`` unless under no_grad) and detached query metrics before/after adaptation."""
        with torch.no_grad():
            pre = self.objective.query_metrics({k: v.detach() for k, v in params.items()}, task)
        phi = self.adapt(params, task)
        post = self.objective.query_metrics(phi, task)
        metrics = {f"{k}_pre_adapt": v for k, v in pre.items()}
        metrics.update({f"{k}_post_adapt": v.detach() for k, v in post.items()})
        return phi, post["loss"], metrics

    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Query metrics after 0, 1, ..., len(lrs) inner steps: ``{name: [T, len(lrs) + 1]}``."""
        params = {k: v.detach() for k, v in params_of(self.model).items()}

        def curve(p: Params, task: Any) -> dict[str, torch.Tensor]:
            rows = [self.objective.query_metrics(p, task)]
            for step, lr in enumerate(lrs):
                p = adapt(
                    lambda q, _s, step=step: self.objective.support_loss(q, task, step),
                    p,
                    lrs=[lr],
                    first_order=True,
                )
                rows.append(self.objective.query_metrics(p, task))
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        with torch.no_grad():
            return map_tasks(curve, params, tasks, batched=self.batched)

    def step(self, tasks: Any, iteration: int) -> dict[str, float]:
        """One meta-update on a meta-batch; returns mean metrics over its tasks."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _means(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in metrics.items()}


class MAML(MetaLearner):
    """Model-agnostic meta-learning (Finn et al., 2017), second order unless ``first_order``."""

    def __init__(
        self,
        model: nn.Module,
        objective: MetaObjective,
        *,
        inner_lrs: Sequence[float],
        outer_lr: float,
        first_order: bool = False,
        batched: bool = True,
    ) -> None:
        super().__init__(model, objective, inner_lrs=inner_lrs, first_order=first_order, batched=batched)
        if batched and not first_order and self.inner_lrs and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(
                "second-order MAML with batched=True through torch's batch norm gives wrong meta-gradients "
                "(a PyTorch vmap bug); use batched=False, or a vmap-safe norm (ConvNet(vmap_safe_norm=True))")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr)

    def meta_loss(self, params: Params, tasks: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean post-adaptation query loss over the meta-batch, differentiable in ``params``.

        Returns the loss and per-task metrics (``[T]`` tensors, detached).
        """
        def one(p: Params, task: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            _, loss, metrics = self._adapt_scored(p, task)
            return loss, metrics

        losses, metrics = map_tasks(one, params, tasks, batched=self.batched)
        return losses.mean(), metrics

    def step(self, tasks: Any, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.meta_loss(params_of(self.model), tasks)
        loss.backward()
        self.optimizer.step()
        return _means(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class FOMAML(MAML):
    """First-order MAML: the meta-gradient is the query gradient at the adapted parameters."""

    def __init__(self, model: nn.Module, objective: MetaObjective, **kwargs: Any) -> None:
        super().__init__(model, objective, first_order=True, **kwargs)


class Pretrain(MAML):
    """Multi-task pretraining baseline: trains ``theta`` on every task's query loss directly.

    Training takes no inner step; evaluation fine-tunes with the inner loop like the others.
    """

    def __init__(self, model: nn.Module, objective: MetaObjective, **kwargs: Any) -> None:
        kwargs["inner_lrs"] = []
        super().__init__(model, objective, first_order=True, **kwargs)


class Reptile(MetaLearner):
    """Reptile (Nichol et al., 2018): move ``theta`` toward the weights k inner steps reach.

    ``epsilon`` (the outer step size) is annealed linearly from ``epsilon_start`` at iteration 0
    to ``epsilon_end`` at ``num_iterations``.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: MetaObjective,
        *,
        inner_lrs: Sequence[float],
        epsilon_start: float,
        epsilon_end: float,
        num_iterations: int,
        batched: bool = True,
    ) -> None:
        super().__init__(model, objective, inner_lrs=inner_lrs, first_order=True, batched=batched)
        self.epsilon_start = epsilon_start
        self.epsilon_end = epsilon_end
        self.num_iterations = num_iterations

    def epsilon(self, iteration: int) -> float:
        return linear_anneal(self.epsilon_start, self.epsilon_end, iteration, self.num_iterations)

    def step(self, tasks: Any, iteration: int) -> dict[str, float]:
        theta = {k: v.detach() for k, v in params_of(self.model).items()}

        def one(p: Params, task: Any) -> tuple[Params, dict[str, torch.Tensor]]:
            phi, _, metrics = self._adapt_scored(p, task)
            return phi, metrics

        with torch.no_grad():
            phis, metrics = map_tasks(one, theta, tasks, batched=self.batched)
            eps = self.epsilon(iteration)
            for name, p in params_of(self.model).items():
                p.add_(eps * (phis[name].mean(0) - theta[name]))
        return _means(metrics)
