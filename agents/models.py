"""Few-shot models of the MAML paper: the sinusoid MLP and the 4-block Omniglot conv net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. 1 -> 40 -> 40 -> 1 for sinusoid regression."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def lstm_step(
    cell: nn.LSTMCell, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``cell`` with its own weights, ``(x [..., in], (h, c) [..., hidden]) -> (h, c)``:
    ``nn.LSTMCell``'s equations (gates i, f, g, o) written out, because torch's fused LSTM kernels
    have no ``torch.func.vmap`` batching rule (Matching Networks' full-context embeddings and the
    Meta-Learner LSTM run under vmap)."""
    h, c = state
    gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class BatchStatNorm2d(nn.Module):
    """Batch norm that always uses the batch's statistics, written out with ``var_mean``.

    The same function as ``nn.BatchNorm2d(track_running_stats=False)`` in training mode, but
    its second-order gradients are right under ``torch.func.vmap``: PyTorch 2.13's batch-norm
    kernel gets them wrong there (see ``tests/test_core.py``). It is slower than the native
    kernel in a plain loop, so :class:`ConvNet` uses it only when asked.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNet(nn.Module):
    """Four blocks of (3x3 conv, 64 filters, batch norm, ReLU, 2x2 max-pool) and a linear head.

    Batch norm always normalises with the statistics of the batch it is given (no running
    statistics), as in MAML: a task's support set during adaptation, its query set when scored.
    This also keeps the model a pure function of its parameters, so it runs under ``vmap``;
    ``vmap_safe_norm=True`` (for second-order MAML with the batched inner loop) swaps the native
    batch-norm kernel for :class:`BatchStatNorm2d`. ``channels_last=True`` keeps weights and
    activations in NHWC layout, which the CPU conv kernels run faster (1.45x for a Reptile
    iteration on 25-image batches here); it is for the per-task loop, not for ``vmap``.
    Input ``[B, C, 28, 28]`` -> logits ``[B, n_way]``.
    """

    def __init__(
        self,
        *,
        n_way: int,
        in_channels: int = 1,
        filters: int = 64,
        blocks: int = 4,
        image_size: int = 28,
        vmap_safe_norm: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            norm = BatchStatNorm2d(filters) if vmap_safe_norm else nn.BatchNorm2d(filters, track_running_stats=False)
            layers += [nn.Conv2d(channels, filters, kernel_size=3, padding=1), norm, nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {blocks} pooling blocks")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(filters * size * size, n_way)
        self.n_way = n_way
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x).flatten(1))
