"""Per-task objectives mapped over a meta-batch: the supervised side of the inner loop.

A task family supplies a :class:`MetaObjective`: a task's support loss (the inner-loop objective)
and its query metrics (the outer objective) for a parameter dict. :class:`TaskwiseObjective`
lifts it to a whole meta-batch, the interface the learners in ``agents/`` use (the RL family's
:class:`metarl.rl.objective.PolicyGradientObjective` offers the same methods).

A meta-batch ``tasks`` is a pytree of tensors (e.g. a NamedTuple) whose leaves are stacked
along a leading task dimension ``T``. With ``batched=True`` the per-task work runs under
``torch.func.vmap`` over that dimension; otherwise it loops over tasks (same math, the fallback
for models or objectives that vmap cannot handle).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from metarl.core.functional import Params, adapt


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


class TaskwiseObjective:
    """A per-task :class:`MetaObjective` over a meta-batch ``[T, ...]`` (vmap or a per-task loop).

    ``adapted`` names the parameters the inner loop moves (None: all of them; ANIL: the head's);
    the others keep ``theta``'s values in every task.
    """

    def __init__(
        self, objective: MetaObjective, *, batched: bool = True, adapted: Collection[str] | None = None
    ) -> None:
        self.objective = objective
        self.batched = batched
        self.adapted = None if adapted is None else frozenset(adapted)

    def adapt_one(self, params: Params, task: Any, *, lrs: Sequence[float], first_order: bool) -> Params:
        """Adapted parameters of one task (a new dict; the model is untouched)."""

        def support(p: Params, step: int) -> torch.Tensor:
            return self.objective.support_loss(p, task, step)

        return adapt(support, params, lrs=lrs, first_order=first_order, adapted=self.adapted)

    def adapt_scored(
        self, params: Params, task: Any, *, lrs: Sequence[float], first_order: bool
    ) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
        """One task: adapted parameters, the post-adaptation query loss (differentiable in
        ``params`` unless under no_grad) and detached query metrics before/after adaptation."""
        with torch.no_grad():
            pre = self.objective.query_metrics({k: v.detach() for k, v in params.items()}, task)
        phi = self.adapt_one(params, task, lrs=lrs, first_order=first_order)
        post = self.objective.query_metrics(phi, task)
        metrics = {f"{k}_pre_adapt": v for k, v in pre.items()}
        metrics.update({f"{k}_post_adapt": v.detach() for k, v in post.items()})
        return phi, post["loss"], metrics

    def adapt(self, params: Params, tasks: Any, *, lrs: Sequence[float], first_order: bool) -> Params:
        """Adapted parameters of every task, stacked: ``{name: [T, ...]}``."""
        return map_tasks(
            lambda p, task: self.adapt_one(p, task, lrs=lrs, first_order=first_order),
            params,
            tasks,
            batched=self.batched,
        )

    def meta_loss(
        self, params: Params, tasks: Any, *, lrs: Sequence[float], first_order: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean post-adaptation query loss over the meta-batch, differentiable in ``params``;
        and per-task metrics (``[T]`` tensors, detached)."""

        def one(p: Params, task: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            _, loss, metrics = self.adapt_scored(p, task, lrs=lrs, first_order=first_order)
            return loss, metrics

        losses, metrics = map_tasks(one, params, tasks, batched=self.batched)
        return losses.mean(), metrics

    def adapt_with_metrics(
        self, params: Params, tasks: Any, *, lrs: Sequence[float]
    ) -> tuple[Params, dict[str, torch.Tensor]]:
        """First-order adapted parameters ``[T, ...]`` and per-task query metrics before/after."""

        def one(p: Params, task: Any) -> tuple[Params, dict[str, torch.Tensor]]:
            phi, _, metrics = self.adapt_scored(p, task, lrs=lrs, first_order=True)
            return phi, metrics

        return map_tasks(one, params, tasks, batched=self.batched)

    def adaptation_curve(self, params: Params, tasks: Any, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Query metrics after 0, 1, ..., len(lrs) inner steps: ``{name: [T, len(lrs) + 1]}``."""
        params = {k: v.detach() for k, v in params.items()}

        def curve(p: Params, task: Any) -> dict[str, torch.Tensor]:
            rows = [self.objective.query_metrics(p, task)]
            for step, lr in enumerate(lrs):
                p = adapt(
                    lambda q, _s, step=step: self.objective.support_loss(q, task, step),
                    p,
                    lrs=[lr],
                    first_order=True,
                    adapted=self.adapted,
                )
                rows.append(self.objective.query_metrics(p, task))
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        with torch.no_grad():
            return map_tasks(curve, params, tasks, batched=self.batched)


def batch_objective(objective: Any, *, batched: bool = True, adapted: Collection[str] | None = None) -> Any:
    """``objective`` as a meta-batch objective: one with ``meta_loss`` (such as the RL family's)
    is returned as is; a per-task :class:`MetaObjective` is wrapped in :class:`TaskwiseObjective`
    (``adapted``: the parameters its inner loop moves, None for all)."""
    if hasattr(objective, "meta_loss"):
        if adapted is not None:
            raise ValueError(
                "adapting only some parameters needs a per-task objective (few-shot), not a meta-batch one"
            )
        return objective
    return TaskwiseObjective(objective, batched=batched, adapted=adapted)
