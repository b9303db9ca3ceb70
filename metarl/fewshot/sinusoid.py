"""Sinusoid regression exactly as in the MAML paper (Finn et al., 2017, section 5.1).

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]``;
inputs ``x ~ U[-5, 5]``; K support points and K query points per task.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metarl.fewshot.batch import FewShotBatch


class SinusoidTasks:
    """Sampler of sinusoid regression tasks; all randomness comes from the caller's generator."""

    def __init__(
        self,
        *,
        k_shot: int,
        k_query: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for name, value in (("k_shot", k_shot), ("k_query", k_query)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be [low, high] with low <= high, got {[lo, hi]}")
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample_params(self, num_tasks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Amplitudes and phases ``[T]`` of ``num_tasks`` tasks."""
        amp = rng.uniform(*self.amplitude, size=num_tasks)
        phase = rng.uniform(*self.phase, size=num_tasks)
        return amp, phase

    def sample(self, num_tasks: int, rng: np.random.Generator) -> FewShotBatch:
        """``num_tasks`` tasks: support ``x, y [T, K, 1]`` and query ``[T, Q, 1]``, float32."""
        amp, phase = self.sample_params(num_tasks, rng)
        x = rng.uniform(*self.x_range, size=(num_tasks, self.k_shot + self.k_query, 1))
        y = amp[:, None, None] * np.sin(x - phase[:, None, None])
        x_t = torch.from_numpy(x.astype(np.float32))
        y_t = torch.from_numpy(y.astype(np.float32))
        k = self.k_shot
        return FewShotBatch(x_t[:, :k], y_t[:, :k], x_t[:, k:], y_t[:, k:])
