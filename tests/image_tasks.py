"""A random few-shot image task for the metric-learner tests (shared by their test modules)."""

from __future__ import annotations

import torch

from metarl.fewshot.batch import FewShotBatch


def random_image_task(n_way: int = 3, k: int = 2, q: int = 2, seed: int = 0) -> FewShotBatch:
    """One task of random 28x28 images: class-major support ``[n_way * k, 1, 28, 28]`` and query
    ``[n_way * q, 1, 28, 28]``, labels ``0..n_way-1``."""
    g = torch.Generator().manual_seed(seed)
    return FewShotBatch(
        torch.rand(n_way * k, 1, 28, 28, generator=g),
        torch.arange(n_way).repeat_interleave(k),
        torch.rand(n_way * q, 1, 28, 28, generator=g),
        torch.arange(n_way).repeat_interleave(q),
    )
