"""Matching Networks (Vinyals et al., 2016): a query's label is an attention-weighted vote of the support labels.

    a(q, x_i)  = softmax_i( s cos(f(q), g(x_i)) )              (attention over the support set S)
    p(n | q)   = sum_i a(q, x_i) [y_i = n]                     (the attended one-hot labels)
    theta     <- Adam(theta, grad mean_tasks -log p(y_q | q))

``s`` is ``scale``: 1 in the paper. Cosines lie in [-1, 1] (in [0, 1] between the backbone's
post-ReLU features), so with ``s = 1`` a 5-way 1-shot query can put at most e / (e + 4) = 0.40 on
its class and the loss never falls below 0.9: on the minimal Omniglot splits (2026-12-01) such a
run's validation accuracy peaked at 81% after 500 iterations and fell to 64% by 7500, while
``s = 10`` gave 94% after 500 and 95% after 1000 (the same seed and data).

Without full-context embeddings (the paper's Omniglot setting) ``f = g = f'``, the conv-4
backbone of MAML's Omniglot model without its head (the same network as every other method of
the table). With full-context embeddings (``fce=True``, the paper's appendix), the support and
query embeddings are conditioned on the whole support set:

    g(x_i, S)   = g'(x_i) + h_fwd_i + h_bwd_i                  (a bidirectional LSTM over g'(x_1..x_S), skip)
    f(q, S)     = h_K, read K times from g(S) by an attention LSTM:
        h_0 = f'(q), c_0 = 0
        r_{k-1} = sum_i softmax_i( h_{k-1} . g(x_i) ) g(x_i)
        h^_k, c_k = LSTM(f'(q), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k = h^_k + f'(q)

The LSTM's hidden state ``[h, r]`` acting on the gates is written as a cell whose input is
``[f'(q), r]`` and whose hidden state is ``h`` (the same affine map of ``f'(q)``, ``h``, ``r``).
The paper does not give K for its experiments; ``fce_steps`` defaults to 5. The bidirectional
LSTM reads the support set in its class-major order (the paper leaves the order open). The
LSTM cells are ``nn.LSTMCell`` modules stepped by :func:`agents.models.lstm_step` (their equations
written out) because ``torch.func.vmap`` (``batched: true``) has no batching rule for PyTorch's
fused LSTM kernels. They are ``self.modules``: one Adam updates
them with the backbone, and checkpoints keep them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agents.models import lstm_step
from metarl.core.functional import Params
from metarl.core.learner import register
from metarl.fewshot.metric import MetricLearner, embed, one_hot


def matching_attention(query: torch.Tensor, support: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Attention ``[Q, S]`` of query embeddings ``[Q, D]`` over support embeddings ``[S, D]``:
    the softmax over the support set of ``scale`` times their cosine similarities (each row sums to one)."""
    return torch.softmax(scale * (F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T), dim=-1)


def matching_probs(
    query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, n_way: int, scale: float = 1.0
) -> torch.Tensor:
    """Class probabilities ``[Q, n_way]``: the attention-weighted sum of the support one-hot labels."""
    return matching_attention(query, support, scale) @ one_hot(support_y, n_way, query.dtype)


class FullContextEmbedding(nn.Module):
    """The paper's full-context embeddings ``g(x_i, S)`` and ``f(q, S)`` of backbone embeddings of size ``dim``."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.forward_lstm = nn.LSTMCell(dim, dim)
        self.backward_lstm = nn.LSTMCell(dim, dim)
        self.attention_lstm = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """``g(x_i, S) = g'(x_i) + h_fwd_i + h_bwd_i`` ``[S, D]`` of backbone support embeddings ``g'`` ``[S, D]``."""
        zero = g.new_zeros(g.shape[-1])
        state, forward = (zero, zero), []
        for x in g:
            state = lstm_step(self.forward_lstm, x, state)
            forward.append(state[0])
        state, backward = (zero, zero), []
        for x in g.flip(0):
            state = lstm_step(self.backward_lstm, x, state)
            backward.append(state[0])
        return g + torch.stack(forward) + torch.stack(backward[::-1])

    def query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``f(q, S) = h_K`` ``[Q, D]``: backbone query embeddings ``f'`` ``[Q, D]`` after K attention
        reads of the full-context support embeddings ``g(S)`` ``[S, D]``."""
        h, c = f, torch.zeros_like(f)
        for _ in range(self.steps):
            r = torch.softmax(h @ g.T, dim=-1) @ g
            h_hat, c = lstm_step(self.attention_lstm, torch.cat([f, r], dim=-1), (h, c))
            h = h_hat + f
        return h


class MatchingNet(MetricLearner):
    """Matching Networks: cosine attention over the support set, optionally with full-context embeddings."""

    def __init__(
        self, model: nn.Module, *, fce: bool = False, fce_steps: int = 5, scale: float = 1.0, **kwargs: Any
    ) -> None:
        if fce_steps < 1:
            raise ValueError(f"fce_steps must be at least 1, got {fce_steps}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        context = FullContextEmbedding(model.head.in_features, fce_steps) if fce else None
        super().__init__(model, modules=context, **kwargs)
        self.scale = float(scale)
        self.fce = self.modules if fce else None  # on the model's device

    def task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities ``[Q, n_way]``: their cross-entropy is ``-log p(y | q)``, their softmax ``p``."""
        z = embed(self.model, params, torch.cat([support_x, query_x]))
        support, query = z[: len(support_x)], z[len(support_x) :]
        if self.fce is not None:
            support = self.fce.support(support)
            query = self.fce.query(query, support)
        probs = matching_probs(query, support, support_y, self.n_way, self.scale)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


@register("matchingnet", family="fewshot")
def build(cfg: Any, model: nn.Module, objective: Any) -> MatchingNet:
    return MatchingNet(
        model,
        n_way=cfg.omniglot.n_way,
        fce=cfg.matchingnet.fce,
        fce_steps=cfg.matchingnet.fce_steps,
        scale=cfg.matchingnet.scale,
        outer_lr=cfg.outer.lr,
        batched=cfg.batched,
    )
