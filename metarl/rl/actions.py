"""From policy actions to env actions: clipping to the bounds, or the reference's action scale.

With ``action_scale = s`` (pytorch-maml-rl's ``normalization_scale``, rllab's ``NormalizedEnv``)
the policy acts in ``[-s, s]`` and the env receives the affine image of the clipped action on
its bounds ``[low, high]``::

    env_action = offset + slope * clip(a, -s, s),   slope = (high - low) / (2 s),   offset = (low + high) / 2

so ``-s -> low`` and ``s -> high``. A Gaussian policy of standard deviation ``sigma`` then acts
with ``slope * sigma`` on the env (``s = 10`` on HalfCheetah's ``[-1, 1]``: ``init_std: 1`` is
0.1). Episodes keep the policy's own (unclipped, unscaled) actions and their log-probabilities.
Without a scale, actions are only clipped to ``[low, high]``.
"""

from __future__ import annotations

import numpy as np


def action_affine(low: np.ndarray, high: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, slope)`` of the map from ``[-scale, scale]`` onto ``[low, high]`` (per action dim)."""
    if not scale > 0:
        raise ValueError(f"action_scale must be > 0, got {scale}")
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(f"action_scale needs finite action bounds, got low={low} high={high}")
    return (low + high) / 2.0, (high - low) / (2.0 * scale)


class ActionMap:
    """The map from policy actions to env actions of one action space, its constants computed once
    (the sampler applies it at every control step)."""

    def __init__(self, low: np.ndarray, high: np.ndarray, scale: float | None) -> None:
        self.low, self.high, self.scale = low, high, scale
        self.affine = None if scale is None else action_affine(low, high, scale)

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        """Env actions ``[..., act_dim]`` (the actions' dtype) for policy actions ``[..., act_dim]``."""
        if self.affine is None:
            return np.clip(actions, self.low, self.high)
        offset, slope = self.affine
        return (offset + slope * np.clip(actions, -self.scale, self.scale)).astype(actions.dtype, copy=False)


def env_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray, scale: float | None) -> np.ndarray:
    """Env actions ``[..., act_dim]`` (the actions' dtype) for policy actions ``[..., act_dim]``."""
    return ActionMap(low, high, scale)(actions)
