"""The Meta-Learner LSTM (Ravi & Larochelle, 2017, "Optimization as a Model for Few-Shot Learning").

An LSTM learns the learner's update rule. Its cell state is the learner's parameter vector, one
coordinate per "batch row"; every coordinate shares the meta-learner's weights (coordinate-wise):

    x_t      = [pre(grad_t), pre(L_t)]                          [N, 4]  (N: the learner's coordinates)
    h_t      = LSTM(x_t, h_{t-1})                               [N, H]  (first layer, H = 20)
    f_t      = sigmoid(W_F [h_t, c_{t-1}, f_{t-1}] + b_F)       [N]     (a learned decay)
    i_t      = sigmoid(W_I [h_t, c_{t-1}, i_{t-1}] + b_I)       [N]     (a learned learning rate)
    c_t      = f_t * c_{t-1} - i_t * grad_t                     [N]     (second layer: the learner's parameters)

with ``grad_t`` and ``L_t`` the gradient and loss of the support set (inner step ``t``'s batch)
at ``c_{t-1}``, and ``c_0`` the learner's initialisation, meta-learned with the meta-learner (it
is the ConvNet's own parameters). The gates also see their previous value ``f_{t-1}`` / ``i_{t-1}``
(zero at ``t = 1``), as in the paper's equations 2-3. After ``T`` updates the query loss at
``c_T`` is the meta-loss; Adam updates the LSTM, ``W_F, b_F, W_I, b_I`` and ``c_0``.

Preprocessing (Andrychowicz et al. 2016, appendix A, p = 10) of each gradient coordinate and of
the loss: ``x -> (log|x| / p, sign(x))`` if ``|x| >= e^-p``, else ``(-1, e^p x)``.

As in the paper, second derivatives are dropped: ``grad_t`` and ``L_t`` are inputs computed at
a detached ``c_{t-1}`` (no gradient flows through the learner's gradients), while ``c_t``
depends on ``c_{t-1}`` through ``f_t * c_{t-1}`` and the gates.

Initialisation as the paper (ranges from the authors' released code): the forget-gate bias high
(uniform in [4, 5]: ``f`` near 1) and the input-gate bias low (uniform in [-5, -4]: ``i`` near
0.01), so the learner starts as SGD with a small step; every other weight uniform in +-0.01.
Batch norm: batch statistics everywhere during meta-training; at evaluation (and in
:class:`~metarl.app.classifier.FewShotClassifier`) the query images are normalised with the
statistics of the support set only (``metalstm.test_bn: support``: the paper keeps running
averages of the support batches' statistics during the updates and uses them for the test set;
here the support set's statistics at the final parameters), or with their own batch's (``batch``,
as MAML).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad_and_value

from agents.maml import means
from agents.models import BatchStatNorm2d, ConvNet, lstm_step
from metarl.core.functional import Params, call, params_of
from metarl.core.learner import Learner, register
from metarl.core.metalearning import map_tasks


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s input scaling: ``[...]`` -> ``[..., 2]``, ``(log|x| / p, sign x)`` where
    ``|x| >= e^-p``, ``(-1, e^p x)`` elsewhere."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    direction = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, direction], -1)


class MetaLearnerLSTM(nn.Module):
    """The two-layer coordinate-wise meta-learner; one call is one update of the learner.

    Args:
        hidden: width ``H`` of the first (standard) LSTM layer.
        p: the preprocessing constant.
        forget_bias / input_bias: ``[low, high]`` of the uniform initialisation of ``b_F`` / ``b_I``.
        weight_init: every weight (the LSTM's, ``W_F``, ``W_I``) and the LSTM's biases start
            uniform in ``[-weight_init, weight_init]``.
    """

    def __init__(
        self,
        hidden: int = 20,
        *,
        p: float = 10.0,
        forget_bias: tuple[float, float] = (4.0, 5.0),
        input_bias: tuple[float, float] = (-5.0, -4.0),
        weight_init: float = 0.01,
    ) -> None:
        super().__init__()
        self.p = p
        self.lstm = nn.LSTMCell(4, hidden)  # input: preprocessed gradient (2) and loss (2)
        self.forget = nn.Linear(hidden + 2, 1)  # W_F, b_F over [h_t, c_{t-1}, f_{t-1}]
        self.input = nn.Linear(hidden + 2, 1)  # W_I, b_I over [h_t, c_{t-1}, i_{t-1}]
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-weight_init, weight_init)
            self.forget.bias.uniform_(*forget_bias)
            self.input.bias.uniform_(*input_bias)

    def initial_state(self, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(h, cell, f, i)`` before the first update: zeros ``[N, H]``, ``[N, H]``, ``[N]``, ``[N]``."""
        h = c0.new_zeros(c0.shape[0], self.lstm.hidden_size)
        return h, torch.zeros_like(h), torch.zeros_like(c0), torch.zeros_like(c0)

    def forward(
        self, grad: torch.Tensor, loss: torch.Tensor, c: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One update: gradient ``[N]``, loss (scalar) and parameters ``c_{t-1}`` ``[N]`` -> ``c_t`` ``[N]``."""
        h, cell, f, i = state
        x = torch.cat([preprocess(grad, self.p), preprocess(loss, self.p).expand(grad.shape[0], 2)], -1)
        h, cell = lstm_step(self.lstm, x, (h, cell))
        f = torch.sigmoid(self.forget(torch.cat([h, c[:, None], f[:, None]], -1))).squeeze(-1)
        i = torch.sigmoid(self.input(torch.cat([h, c[:, None], i[:, None]], -1))).squeeze(-1)
        return f * c - i * grad, (h, cell, f, i)


def support_stat_outputs(model: nn.Module, params: Params, support_x: torch.Tensor, query_x: torch.Tensor):
    """Outputs ``[Q, out]`` of a :class:`ConvNet` for the queries, every batch norm normalising with
    the statistics of the support images ``[S, C, H, W]`` only (the paper's meta-test batch norm);
    any other model: its outputs for the queries alone (it has no batch statistics)."""
    if not isinstance(model, ConvNet):
        return call(model, params, query_x)
    x, n = torch.cat([support_x, query_x]), len(support_x)
    for index, layer in enumerate(model.features):
        weight, bias = params.get(f"features.{index}.weight"), params.get(f"features.{index}.bias")
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, (nn.BatchNorm2d, BatchStatNorm2d)):
            var, mean = torch.var_mean(x[:n], dim=(0, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) * torch.rsqrt(var + layer.eps) * weight[:, None, None] + bias[:, None, None]
        else:
            x = layer(x)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])[n:]


class MetaLSTM(Learner):
    """The learner (``model``, whose parameters are ``c_0``) trained by a meta-learner LSTM.

    Args:
        model: the learner (``c_0``: its parameters, meta-learned).
        objective: the per-task few-shot objective (support loss of each update, query metrics).
        steps: updates ``T`` of the learner in meta-training.
        meta_learner: the LSTM (checkpointed with the learner; moved to the model's device).
        outer_lr: Adam learning rate of the meta-learner and ``c_0``.
        grad_clip: clip the meta-gradient's global norm to this (0: no clipping).
        test_bn: ``"support"`` or ``"batch"`` statistics for query images at evaluation.
        batched: map over tasks with ``torch.func.vmap`` (else a per-task loop).
    """

    first_order = True  # the learner's gradients are inputs (second derivatives dropped)

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        *,
        steps: int,
        meta_learner: MetaLearnerLSTM,
        outer_lr: float = 1e-3,
        grad_clip: float = 0.25,
        test_bn: str = "support",
        batched: bool = False,
    ) -> None:
        if steps < 1:
            raise ValueError(f"metalstm needs at least 1 update of the learner, got {steps}")
        if test_bn not in ("support", "batch"):
            raise ValueError(f"test_bn must be 'support' or 'batch', got {test_bn!r}")
        self.model = model
        self.objective = objective
        self.inner_lrs = [0.0] * steps  # only their number counts: the LSTM makes the updates
        self.meta = meta_learner.to(next(model.parameters()).device)
        self.grad_clip = grad_clip
        self.test_bn = test_bn
        self.batched = batched
        theta = params_of(model)
        self.shapes = {name: p.shape for name, p in theta.items()}
        self.optimizer = torch.optim.Adam([*model.parameters(), *self.meta.parameters()], lr=outer_lr)

    # -- the learner's parameters as the LSTM's cell state ---------------------------------------
    def flatten(self, params: Params) -> torch.Tensor:
        """``{name: tensor}`` -> ``[N]`` (the cell state)."""
        return torch.cat([params[name].reshape(-1) for name in self.shapes])

    def unflatten(self, c: torch.Tensor) -> Params:
        """``[N]`` -> ``{name: tensor}`` of the model's shapes."""
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        return {name: part.view(shape) for (name, shape), part in zip(self.shapes.items(), c.split(sizes), strict=True)}

    def unroll(self, params: Params, task: Any, steps: int) -> list[Params]:
        """The learner's parameters after 0, 1, ..., ``steps`` updates on one task's support set,
        differentiable in ``params`` (``c_0``) and the meta-learner (not through the gradients)."""
        c = self.flatten(params)
        state = self.meta.initial_state(c)
        out = [params]
        for t in range(steps):

            def support(p: Params, t: int = t) -> torch.Tensor:
                return self.objective.support_loss(p, task, t)

            grads, loss = grad_and_value(support)(self.unflatten(c.detach()))  # inputs: no second derivatives
            c, state = self.meta(self.flatten(grads).detach(), loss.detach(), c, state)
            out.append(self.unflatten(c))
        return out

    def query_metrics(self, params: Params, task: Any, *, evaluation: bool) -> dict[str, torch.Tensor]:
        """Query ``loss`` (and ``accuracy``) of one task; at evaluation with ``test_bn: support``
        the queries are normalised with the support set's batch statistics."""
        if not evaluation or self.test_bn == "batch" or self.objective.kind == "regression":
            return self.objective.query_metrics(params, task)
        logits = support_stat_outputs(self.model, params, task.support_x, task.query_x)
        return {
            "loss": F.cross_entropy(logits, task.query_y),
            "accuracy": (logits.argmax(-1) == task.query_y).float().mean(),
        }

    # -- the learner interface ---------------------------------------------------------------
    def step(self, batch: Any, iteration: int) -> dict[str, float]:
        def one(params: Params, task: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            path = self.unroll(params, task, len(self.inner_lrs))
            with torch.no_grad():
                pre = self.objective.query_metrics({k: v.detach() for k, v in params.items()}, task)
            post = self.objective.query_metrics(path[-1], task)
            metrics = {f"{k}_pre_adapt": v for k, v in pre.items()}
            metrics.update({f"{k}_post_adapt": v.detach() for k, v in post.items()})
            return post["loss"], metrics

        self.optimizer.zero_grad(set_to_none=True)
        losses, metrics = map_tasks(one, params_of(self.model), batch, batched=self.batched)
        losses.mean().backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.meta.parameters()], self.grad_clip)
        self.optimizer.step()
        return means(metrics)

    def adapt(
        self, params: Params, support: Any, *, lrs: Sequence[float] | None = None, first_order: bool | None = None
    ) -> Params:
        """Per-task parameters ``{name: [T, ...]}`` after ``len(lrs)`` updates (default: ``steps``)."""
        steps = len(self.inner_lrs if lrs is None else lrs)
        return map_tasks(lambda p, task: self.unroll(p, task, steps)[-1], params, support, batched=self.batched)

    def adaptation_curve(self, tasks: Any, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """Query metrics ``{name: [T, len(lrs) + 1]}`` after 0..len(lrs) updates of the LSTM."""

        def curve(params: Params, task: Any) -> dict[str, torch.Tensor]:
            rows = [self.query_metrics(p, task, evaluation=True) for p in self.unroll(params, task, len(lrs))]
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        with torch.no_grad():
            return map_tasks(curve, self.theta(), tasks, batched=self.batched)

    def adapt_task(self, task: Any, lrs: Sequence[float]) -> Params:
        """One task's learner parameters after ``len(lrs)`` updates."""
        with torch.no_grad():
            return self.unroll(self.theta(), task, len(lrs))[-1]

    def task_outputs(self, adapted: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        if self.test_bn == "batch":
            return super().task_outputs(adapted, support_x, query_x)
        with torch.no_grad():
            return support_stat_outputs(self.model, adapted, support_x, query_x)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "meta_learner": self.meta.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "meta_learner" in state:
            self.meta.load_state_dict(state["meta_learner"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


@register("metalstm", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> MetaLSTM:
    c = cfg.metalstm
    meta = MetaLearnerLSTM(
        c.hidden,
        p=c.preprocess_p,
        forget_bias=tuple(c.forget_bias),
        input_bias=tuple(c.input_bias),
        weight_init=c.weight_init,
    )
    return MetaLSTM(
        model,
        objective,
        steps=cfg.inner.steps,
        meta_learner=meta,
        outer_lr=cfg.outer.lr,
        grad_clip=c.grad_clip,
        test_bn=c.test_bn,
        batched=cfg.batched,
    )
