"""The learner interface every algorithm implements, and the registry that names them.

An algorithm is a :class:`Learner` subclass in ``agents/`` plus a builder registered under the
name a config uses (``algorithm: maml_trpo``) for a family of experiments (``"rl"`` or
``"fewshot"``)::

    @register("my_algo", family="fewshot")
    def build(cfg, model, objective) -> Learner:
        return MyAlgo(model, objective, inner_lrs=inner_lrs(cfg.inner.lr, cfg.inner.steps))

The experiment loop calls every learner the same way: ``step(batch, iteration) -> metrics`` once
per meta-iteration, ``adapt(params, support)`` to adapt to tasks (sampling, evaluation,
``metarl adapt``), and ``state_dict`` / ``load_state_dict`` for checkpoints (a learner's own
learned modules, such as learned learning rates, go there with its optimizer state). Few-shot
learners are evaluated through ``adaptation_curve(tasks, lrs)`` and used on a user's data
(:class:`metarl.app.classifier.FewShotClassifier`) through ``adapt_task`` and ``task_outputs``;
the defaults are the gradient-based inner loop of the learner's objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from metarl.core.functional import Params, call, params_of

FAMILIES = ("rl", "fewshot")
Builder = Callable[[Any, nn.Module, Any], "Learner"]
_REGISTRY: dict[tuple[str, str], Builder] = {}


class Learner:
    """A meta-learner: a model (``theta``), an objective, inner learning rates and a meta-update.

    ``batch`` is what the family hands over for one meta-iteration: a few-shot task batch (a
    pytree with a leading task dimension ``[T, ...]``) or an RL batch of episodes
    (:class:`metarl.rl.objective.RLBatch`). ``support`` is the data adaptation uses: the task
    batch itself, or the list of inner-step episodes.
    """

    model: nn.Module
    objective: Any
    inner_lrs: list[float]
    first_order: bool = True
    uses_query: bool = True
    """Whether :meth:`step` learns from the query data (an RL batch's validation episodes). When
    False (Reptile) those episodes are only monitoring, and the env steps that count as training
    cost leave them out."""

    def theta(self) -> Params:
        """The meta-parameters, detached."""
        return {k: v.detach() for k, v in params_of(self.model).items()}

    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        """One meta-update of the model from a meta-batch; returns scalar metrics."""
        raise NotImplementedError

    def adapt(
        self, params: Params, support: Any, *, lrs: Sequence[float] | None = None, first_order: bool | None = None
    ) -> Params:
        """Per-task adapted parameters ``{name: [T, ...]}`` after ``len(lrs)`` inner steps from ``params``.

        ``lrs`` defaults to the learner's inner learning rates and ``first_order`` to the learner's
        own setting (second-order learners keep the graph through the inner loop).
        """
        lrs = self.inner_lrs if lrs is None else list(lrs)
        first_order = self.first_order if first_order is None else first_order
        return self.objective.adapt(params, support, lrs=lrs, first_order=first_order)

    # -- evaluation and prediction (few-shot) --------------------------------------------------
    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, Any]:
        """Query metrics of each task after 0, 1, ..., ``len(lrs)`` adaptation steps, from ``theta``:
        ``{name: [T, len(lrs) + 1]}`` (few-shot: ``loss`` and ``accuracy``, or ``loss`` for
        regression). A learner that adapts without gradient steps (a metric-based one) returns one
        column ``[T, 1]``: its metrics after it has seen the support set."""
        return self.objective.adaptation_curve(self.theta(), tasks, lrs)

    def adapt_task(self, task: Any, lrs: Sequence[float]) -> Any:
        """What adaptation to one few-shot task keeps (its support set; no task dimension):
        by default the parameters after ``len(lrs)`` inner steps. Read by :meth:`task_outputs`."""
        with torch.no_grad():
            return self.objective.adapt_one(self.theta(), task, lrs=lrs, first_order=True)

    def task_outputs(self, adapted: Any, support_x: Any, query_x: Any) -> Any:
        """Outputs ``[Q, out]`` (logits, or regression values) for query inputs ``[Q, ...]`` of a
        task adapted by :meth:`adapt_task`. The model sees the support and query inputs in one
        batch (batch norm uses their joint statistics), so any number of queries, even one, works."""
        with torch.no_grad():
            return call(self.model, adapted, torch.cat([support_x, query_x]))[len(support_x) :]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def register(name: str, *, family: str) -> Callable[[Builder], Builder]:
    """Register ``builder(cfg, model, objective) -> Learner`` as algorithm ``name`` of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def decorate(builder: Builder) -> Builder:
        key = (family, name)
        if key in _REGISTRY and _REGISTRY[key] is not builder:
            raise ValueError(f"algorithm {name!r} is already registered for the {family} family")
        _REGISTRY[key] = builder
        return builder

    return decorate


def algorithms(family: str) -> list[str]:
    """The registered algorithm names of ``family``, sorted."""
    return sorted(name for fam, name in _REGISTRY if fam == family)


def build_learner(family: str, cfg: Any, model: nn.Module, objective: Any) -> Learner:
    """The learner that ``cfg.algorithm`` names, built for ``model`` and ``objective``."""
    try:
        builder = _REGISTRY[(family, cfg.algorithm)]
    except KeyError:
        raise ValueError(
            f"algorithm {cfg.algorithm!r} is not registered for the {family} family; "
            f"registered: {', '.join(algorithms(family))}"
        ) from None
    return builder(cfg, model, objective)
