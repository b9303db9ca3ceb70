"""The meta-batch of the few-shot family: support and query sets of T tasks, stacked."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FewShotBatch(NamedTuple):
    """T few-shot tasks; leaves are stacked on a leading task dimension (a pytree for vmap).

    Classification: ``support_x [T, N*K, C, H, W]`` float32, ``support_y [T, N*K]`` int64,
    ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``. Regression: ``x [T, K, 1]``,
    ``y [T, K, 1]`` float32.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> FewShotBatch:
        return FewShotBatch(*(t.to(device, non_blocking=True) for t in self))
