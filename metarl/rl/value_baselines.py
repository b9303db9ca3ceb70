"""Baselines: value estimates ``V(s_t)`` fitted to each task's returns.

:class:`LinearFeatureBaseline` is the linear feature baseline of MAML-TRPO reproductions
(Duan et al., 2016, rllab; pytorch-maml-rl). The features of step ``h`` of an episode with
observation ``o`` are::

    phi(o, h) = [o, o**2, t, t**2, t**3, 1],   t = h / 100        (dim F = 2 * obs_dim + 4)

(``o**2`` elementwise), and a zero row where the step is masked. The final observation of an
episode of length ``L`` uses ``t = L / 100``. Unlike rllab, observations are not clipped.

The weights are fitted per task by ridge regression of the discounted returns ``y`` on the
features ``X`` of that task's real steps (all its episodes)::

    (X^T X + reg * I) w = X^T y

in float64: one batched Cholesky solve for all ``N`` tasks (the matrix is symmetric positive
definite). Not a batched LU solve: with torch 2.13's CPU build and more than one thread, a
batched ``torch.linalg.solve_ex`` of Ant-sized systems (F = 214) fails inside MKL
("DLASWP"), while the same matrices solve one at a time.

Bootstrapped targets (a time limit that is not part of the task, see
:func:`metarl.rl.advantages.compute_advantages`): a truncated episode's return continues past
its last step with the baseline's own value of the final observation,
``y_t = G_t + gamma^(L-t) * phi(o_L, L) . w``. The weights are the exact fixed point of the
ridge regression on those targets, one (non-symmetric) linear solve per task::

    (X^T X + reg * I - X^T B) w = X^T G,     B[t] = gamma^(L-t) * phi(o_L, L)  (0 if terminated)
 Where a task's solution is not finite (or
the system is singular, or not positive definite for Cholesky), that task's ``reg`` is multiplied by 10 and the
solve retried, at most 5 times; a ``reg_coeff`` of 0 starts its retries from
``1e-8 * max(mean diag(X^T X), 1)`` since 10 * 0 is still 0. Then ``V(s_t) = phi(o_t, t) . w``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from metarl.rl.episodes import Episodes

#: How often a non-finite solve is retried with ``reg`` multiplied by 10.
MAX_REG_RETRIES = 5
#: Step index divisor in the time features.
TIME_SCALE = 100.0


def _solve(a: torch.Tensor, b: torch.Tensor, *, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Solutions ``[N, F, 1]`` of ``a [N, F, F] x = b [N, F, 1]`` and a status per system (0: solved)."""
    if symmetric:
        chol, info = torch.linalg.cholesky_ex(a)
        return torch.cholesky_solve(b, chol), info
    solved = [torch.linalg.solve_ex(a[i], b[i]) for i in range(a.shape[0])]  # one at a time: see the module doc
    return torch.stack([x for x, _ in solved]), torch.stack([info for _, info in solved])


class Baseline(Protocol):
    """A per-task baseline: stateless ``fit`` returns weights, ``values`` evaluates them."""

    def fit(
        self, episodes: Episodes, returns: torch.Tensor, *, bootstrap_discounts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-task weights fitted to ``returns [N, H, E]`` (plus, with ``bootstrap_discounts [N, H, E]``,
        the baseline's own final value times those discounts)."""
        ...

    def values(self, episodes: Episodes, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [N, H, E], final_values [N, E])`` under ``weights``."""
        ...


class LinearFeatureBaseline:
    """Linear regression of returns on ``[o, o**2, t, t**2, t**3, 1]``, fitted per task.

    Stateless: :meth:`fit` returns the weights ``[N, F]`` (float64) and :meth:`values` takes them.
    """

    def __init__(self, *, reg_coeff: float = 1e-5) -> None:
        if not reg_coeff >= 0.0:
            raise ValueError(f"reg_coeff must be >= 0, got {reg_coeff}")
        self.reg_coeff = float(reg_coeff)

    @staticmethod
    def num_features(obs_dim: int) -> int:
        """``F = 2 * obs_dim + 4``."""
        return 2 * obs_dim + 4

    def features(
        self,
        observations: torch.Tensor,
        mask: torch.Tensor,
        *,
        time_offset: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Features ``[N, H, E, F]`` of ``observations [N, H, E, obs_dim]``; zero rows where ``mask`` is 0.

        The time index of step ``h`` is ``h + time_offset``; ``time_offset`` is an int or a
        tensor broadcastable to ``[N, E]`` (per episode), 0 when None. Dtype: the observations'.
        """
        if observations.dim() != 4:
            raise ValueError(f"observations must be [N, H, E, obs_dim], got shape {tuple(observations.shape)}")
        n, h, e, _ = observations.shape
        if tuple(mask.shape) != (n, h, e):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected [N, H, E] = {(n, h, e)} "
                f"from observations {tuple(observations.shape)}"
            )
        dtype = observations.dtype
        steps = torch.arange(h, device=observations.device, dtype=dtype).view(1, h, 1)
        if time_offset is not None:
            offset = torch.as_tensor(time_offset, device=observations.device).to(dtype)
            steps = steps + offset.unsqueeze(-2) if offset.dim() >= 1 else steps + offset
        t = (steps / TIME_SCALE).expand(n, h, e).unsqueeze(-1)  # [N, H, E, 1]
        ones = torch.ones_like(t)
        feats = torch.cat([observations, observations.square(), t, t.square(), t.pow(3), ones], dim=-1)
        # where, not multiply: anything under the mask (even inf/nan) gives an exact zero row
        return torch.where(mask.unsqueeze(-1) > 0, feats, torch.zeros((), dtype=dtype, device=feats.device))

    def final_features(self, final_observations: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features ``[N, E, F]`` of ``final_observations [N, E, obs_dim]`` at time index ``lengths [N, E]``."""
        if final_observations.dim() != 3:
            raise ValueError(f"final_observations must be [N, E, obs_dim], got shape {tuple(final_observations.shape)}")
        n, e, _ = final_observations.shape
        if tuple(lengths.shape) != (n, e):
            raise ValueError(
                f"lengths has shape {tuple(lengths.shape)}, expected [N, E] = {(n, e)} "
                f"from final_observations {tuple(final_observations.shape)}"
            )
        ones = torch.ones(n, 1, e, dtype=final_observations.dtype, device=final_observations.device)
        return self.features(final_observations.unsqueeze(1), ones, time_offset=lengths).squeeze(1)

    def fit(
        self, episodes: Episodes, returns: torch.Tensor, *, bootstrap_discounts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ridge-regression weights ``[N, F]`` (float64) of ``returns [N, H, E]`` per task.

        ``bootstrap_discounts [N, H, E]``: ``gamma^(L-t)`` at the steps of truncated episodes (0
        elsewhere); the targets then include the fitted baseline's value of each episode's final
        observation (the fixed point in the module doc). None: the targets are ``returns``.
        Only real steps count: masked rows of the features and masked returns are zeroed.
        Raises ``RuntimeError`` if some task's solution stays non-finite after the retries.
        """
        mask = episodes.mask
        if tuple(returns.shape) != tuple(mask.shape):
            raise ValueError(
                f"returns has shape {tuple(returns.shape)}, expected mask.shape [N, H, E] = {tuple(mask.shape)}"
            )
        x = self.features(episodes.observations.double(), mask)  # [N, H, E, F]
        y = torch.where(mask > 0, returns.double(), 0.0)  # [N, H, E]
        xtx = torch.einsum("nhef,nheg->nfg", x, x)  # [N, F, F]
        xty = torch.einsum("nhef,nhe->nf", x, y).unsqueeze(-1)  # [N, F, 1]
        if bootstrap_discounts is not None:
            if tuple(bootstrap_discounts.shape) != tuple(mask.shape):
                raise ValueError(
                    f"bootstrap_discounts has shape {tuple(bootstrap_discounts.shape)}, expected mask.shape "
                    f"[N, H, E] = {tuple(mask.shape)}"
                )
            x_final = self.final_features(episodes.final_observations.double(), episodes.lengths)  # [N, E, F]
            d = torch.where(mask > 0, bootstrap_discounts.double(), 0.0)  # [N, H, E]
            xtb = torch.einsum("nhef,nhe,neg->nfg", x, d, x_final)  # X^T B
            xtx = xtx - xtb
        num_feats = xtx.shape[-1]
        eye = torch.eye(num_feats, dtype=xtx.dtype, device=xtx.device)

        reg = torch.full((xtx.shape[0],), self.reg_coeff, dtype=xtx.dtype, device=xtx.device)
        floor = 1e-8 * xtx.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)  # first nonzero reg if 0
        for attempt in range(MAX_REG_RETRIES + 1):
            weights, info = _solve(xtx + reg.view(-1, 1, 1) * eye, xty, symmetric=bootstrap_discounts is None)
            bad = (info != 0) | ~torch.isfinite(weights).all(dim=(-2, -1))
            if not bad.any():
                return weights.squeeze(-1)
            if attempt == MAX_REG_RETRIES:
                break
            reg = torch.where(bad, torch.maximum(reg * 10.0, floor), reg)
        tasks = bad.nonzero().flatten().tolist()
        raise RuntimeError(
            f"linear baseline fit is not finite for tasks {tasks} after {MAX_REG_RETRIES} retries "
            f"(reg_coeff={self.reg_coeff}, last reg={reg[bad].tolist()}); check the observations and "
            f"returns for inf/nan or use a larger reg_coeff"
        )

    def values(self, episodes: Episodes, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [N, H, E], final_values [N, E])`` in the rewards' dtype; values are 0 where masked."""
        n, _, _, obs_dim = episodes.observations.shape
        num_feats = self.num_features(obs_dim)
        if tuple(weights.shape) != (n, num_feats):
            raise ValueError(f"weights has shape {tuple(weights.shape)}, expected [N, F] = {(n, num_feats)}")
        w = weights.double()
        x = self.features(episodes.observations.double(), episodes.mask)
        x_final = self.final_features(episodes.final_observations.double(), episodes.lengths)
        values = torch.einsum("nhef,nf->nhe", x, w)
        final_values = torch.einsum("nef,nf->ne", x_final, w)
        dtype = episodes.rewards.dtype
        return values.to(dtype), final_values.to(dtype)
