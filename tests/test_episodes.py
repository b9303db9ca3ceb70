"""Tests for metarl.rl.episodes (Episodes, returns, GAE, normalisation) and metarl.rl.value_baselines.

Expected numbers are written out by hand (the arithmetic is in the comments) or come from
plain-Python per-episode loops written here, independently of the vectorised code.
"""

from __future__ import annotations

import pytest
import torch

from metarl.rl import value_baselines
from metarl.rl.advantages import (
    bootstrap_discounts,
    compute_advantages,
    discounted_returns,
    gae,
    normalize_advantages,
)
from metarl.rl.episodes import Episodes
from metarl.rl.value_baselines import MAX_REG_RETRIES, LinearFeatureBaseline

# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

GARBAGE = 100.0  # written under the mask: must never reach a result


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None, atol: float | None = None
) -> None:
    """Like ``torch.testing.assert_close`` (same default tolerances) without its slow first call
    (in torch 2.13 it imports ``torch.distributed.tensor``, about 2 s)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    double = actual.dtype == torch.float64
    rtol = (1e-7 if double else 1.3e-6) if rtol is None else rtol
    atol = (1e-7 if double else 1e-5) if atol is None else atol
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        worst = float((actual - expected).abs().max())
        raise AssertionError(
            f"not close (max abs diff {worst:.3g}; rtol={rtol}, atol={atol}):\nactual\n{actual}\nexpected\n{expected}"
        )


def pad(
    per_task: list[list[list[float]]], horizon: int, *, fill: float = 0.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``per_task[n][e]`` = the steps of episode e of task n -> ``[N, H, E]``, padded with ``fill``."""
    n, e = len(per_task), len(per_task[0])
    out = torch.full((n, horizon, e), fill, dtype=dtype)
    for i, episodes in enumerate(per_task):
        for j, steps in enumerate(episodes):
            out[i, : len(steps), j] = torch.tensor(steps, dtype=dtype)
    return out


def mask_of(lengths: list[list[int]], horizon: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[N, H, E]`` prefix mask of the given episode lengths ``[N][E]``."""
    return (torch.arange(horizon).view(1, -1, 1) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def random_episodes(
    lengths: list[list[int]],
    *,
    horizon: int,
    obs_dim: int = 2,
    act_dim: int | None = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Episodes:
    """A valid random batch with the given lengths ``[N][E]``; zeros after each episode's end."""
    g = torch.Generator().manual_seed(seed)
    n, e = len(lengths), len(lengths[0])
    mask = mask_of(lengths, horizon, dtype)
    obs = torch.randn(n, horizon, e, obs_dim, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    if act_dim is None:
        actions = torch.randint(0, 3, (n, horizon, e), generator=g) * mask.long()
    else:
        actions = torch.randn(n, horizon, e, act_dim, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    return Episodes(
        observations=obs,
        actions=actions,
        rewards=torch.randn(n, horizon, e, generator=g, dtype=dtype) * mask,
        log_probs=-torch.rand(n, horizon, e, generator=g, dtype=dtype) * mask,
        mask=mask,
        final_observations=torch.randn(n, e, obs_dim, generator=g, dtype=dtype),
        terminated=torch.rand(n, e, generator=g) < 0.5,
        lengths=torch.tensor(lengths, dtype=torch.int64),
    ).check()


def reference_returns(rewards: list[float], gamma: float) -> list[float]:
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def reference_gae(
    rewards: list[float], values: list[float], last_value: float, gamma: float, lam: float
) -> list[float]:
    """GAE of one episode; ``last_value`` is V after its last step (0 if terminated)."""
    out, a = [], 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else last_value
        a = rewards[t] + gamma * next_v - values[t] + gamma * lam * a
        out.append(a)
    return out[::-1]


def per_episode(x: torch.Tensor, lengths: torch.Tensor) -> list[list[list[float]]]:
    """``[N, H, E]`` -> nested lists of each episode's real steps."""
    n, _, e = x.shape
    return [[x[i, : int(lengths[i, j]), j].tolist() for j in range(e)] for i in range(n)]


# ------------------------------------------------------------------------------------------
# Discounted returns
# ------------------------------------------------------------------------------------------


def test_discounted_returns_mixed_lengths():
    # gamma = 0.5, H = 3; lengths: task 0 [1, 3, 2], task 1 [3, 3, 1]
    lengths = [[1, 3, 2], [3, 3, 1]]
    rewards = pad([[[2.0], [1.0, 2.0, 4.0], [4.0, 2.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 8.0], [-3.0]]], 3, fill=GARBAGE)
    got = discounted_returns(rewards, mask_of(lengths, 3), 0.5)
    expected = pad(
        [
            [
                [2.0],  # ends at step 0
                [3.0, 4.0, 4.0],  # 4; 2 + .5*4 = 4; 1 + .5*4 = 3   (full horizon)
                [5.0, 2.0],
            ],  # 2; 4 + .5*2 = 5
            [
                [1.75, 1.5, 1.0],  # 1; 1 + .5 = 1.5; 1 + .75 = 1.75
                [2.0, 4.0, 8.0],  # 8; 0 + 4; 0 + 2
                [-3.0],
            ],
        ],
        3,
    )
    assert_close(got, expected, rtol=0, atol=0)


def test_discounted_returns_gamma_edges():
    lengths = [[2, 3]]
    rewards = pad([[[1.0, 2.0], [3.0, 4.0, 5.0]]], 3, fill=GARBAGE)
    mask = mask_of(lengths, 3)
    assert_close(discounted_returns(rewards, mask, 0.0), rewards * mask)
    assert_close(discounted_returns(rewards, mask, 1.0), pad([[[3.0, 2.0], [12.0, 9.0, 5.0]]], 3))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        discounted_returns(rewards, mask, 1.5)
    with pytest.raises(ValueError, match="mask has shape"):
        discounted_returns(rewards, mask[:, :2], 0.9)


# ------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------


def test_gae_lambda_one_is_returns_minus_values_when_terminated():
    lengths = [[1, 4, 2], [4, 3, 1]]
    ep = random_episodes(lengths, horizon=4, seed=1)
    g = torch.Generator().manual_seed(2)
    values = torch.randn(2, 4, 3, generator=g, dtype=torch.float64) * ep.mask
    terminated = torch.ones(2, 3, dtype=torch.bool)
    final_values = torch.randn(2, 3, generator=g, dtype=torch.float64)  # ignored: all terminated
    adv = gae(ep.rewards, values, ep.mask, terminated=terminated, final_values=final_values, gamma=0.9, lam=1.0)
    expected = (discounted_returns(ep.rewards, ep.mask, 0.9) - values) * ep.mask
    assert_close(adv, expected)


def test_gae_lambda_zero_is_td_error():
    # gamma = 0.5, lam = 0, H = 2. Both episodes: rewards [1, 2], values [3, 4].
    # e0 terminated: A1 = 2 + 0 - 4 = -2;           A0 = 1 + .5*4 - 3 = 0
    # e1 truncated, V(final) = 6: A1 = 2 + .5*6 - 4 = 1; A0 = 0
    # e2 length 1, truncated, V(final) = 2, reward 1, value 3: A0 = 1 + .5*2 - 3 = -1
    lengths = [[2, 2, 1]]
    rewards = pad([[[1.0, 2.0], [1.0, 2.0], [1.0]]], 2, fill=GARBAGE)
    values = pad([[[3.0, 4.0], [3.0, 4.0], [3.0]]], 2, fill=GARBAGE)
    adv = gae(
        rewards,
        values,
        mask_of(lengths, 2),
        terminated=torch.tensor([[True, False, False]]),
        final_values=torch.tensor([[GARBAGE, 6.0, 2.0]], dtype=torch.float64),
        gamma=0.5,
        lam=0.0,
    )
    assert_close(adv, pad([[[0.0, -2.0], [0.0, 1.0], [-1.0]]], 2), rtol=0, atol=0)


def test_gae_truncated_bootstraps_terminated_does_not():
    # one step each: r = 1, V = 0.5, V(final) = 2, gamma = 0.9
    # terminated: 1 - 0.5 = 0.5;   truncated: 1 + 0.9*2 - 0.5 = 2.3
    rewards = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    values = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    adv = gae(
        rewards,
        values,
        torch.ones(1, 1, 2, dtype=torch.float64),
        terminated=torch.tensor([[True, False]]),
        final_values=torch.tensor([[2.0, 2.0]], dtype=torch.float64),
        gamma=0.9,
        lam=0.95,
    )
    assert_close(adv, torch.tensor([[[0.5, 2.3]]], dtype=torch.float64))


def test_gae_hand_computed_three_steps():
    # gamma = 0.9, lam = 0.8 (gamma*lam = 0.72); rewards [1, 0, 2], values [0.5, 1.0, 1.5], H = 4.
    # deltas: d2 = 2 + .9*V3 - 1.5; d1 = 0 + .9*1.5 - 1.0 = 0.35; d0 = 1 + .9*1.0 - 0.5 = 1.4
    # terminated (V3 = 0): d2 = 0.5; A2 = 0.5; A1 = .35 + .72*.5 = 0.71; A0 = 1.4 + .72*.71 = 1.9112
    # truncated (V3 = V(final) = 2): d2 = 2.3; A2 = 2.3; A1 = .35 + .72*2.3 = 2.006;
    #                                 A0 = 1.4 + .72*2.006 = 2.84432
    # The value 99 at the masked step h = 3 must not be used as V_{t+1} at h = 2.
    rewards = pad([[[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]], 4, fill=GARBAGE)
    values = pad([[[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]], 4, fill=99.0)
    adv = gae(
        rewards,
        values,
        mask_of([[3, 3]], 4),
        terminated=torch.tensor([[True, False]]),
        final_values=torch.tensor([[2.0, 2.0]], dtype=torch.float64),
        gamma=0.9,
        lam=0.8,
    )
    expected = pad([[[1.9112, 0.71, 0.5], [2.84432, 2.006, 2.3]]], 4)
    assert_close(adv, expected)


def test_gae_matches_reference_loop():
    lengths = [[1, 5, 3, 5], [2, 4, 5, 1], [5, 5, 5, 5]]
    ep = random_episodes(lengths, horizon=5, seed=3)
    g = torch.Generator().manual_seed(4)
    values = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # nonzero under the mask too
    final_values = torch.randn(3, 4, generator=g, dtype=torch.float64)
    gamma, lam = 0.95, 0.9
    adv = gae(ep.rewards, values, ep.mask, terminated=ep.terminated, final_values=final_values, gamma=gamma, lam=lam)
    rews, vals = per_episode(ep.rewards, ep.lengths), per_episode(values, ep.lengths)
    expected = pad(
        [
            [
                reference_gae(
                    rews[i][j], vals[i][j], 0.0 if ep.terminated[i, j] else float(final_values[i, j]), gamma, lam
                )
                for j in range(4)
            ]
            for i in range(3)
        ],
        5,
    )
    assert_close(adv, expected)
    with pytest.raises(ValueError, match="final_values has shape"):
        gae(
            ep.rewards,
            values,
            ep.mask,
            terminated=ep.terminated,
            final_values=final_values[:, :2],
            gamma=gamma,
            lam=lam,
        )
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got -0.1"):
        gae(ep.rewards, values, ep.mask, terminated=ep.terminated, final_values=final_values, gamma=gamma, lam=-0.1)


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


def test_normalize_hand_computed():
    # task 0: real values 1, 2, 3 -> mean 2, population std sqrt(2/3) -> -/+ 1/sqrt(2/3) = -/+ 1.224744871391589
    # task 1: real values 5, 5 -> std 0 -> all 0 (eps keeps it finite)
    adv = pad([[[1.0, 2.0], [3.0]], [[5.0], [5.0]]], 2, fill=GARBAGE)
    got = normalize_advantages(adv, mask_of([[2, 1], [1, 1]], 2))
    c = 1.224744871391589
    assert_close(got, pad([[[-c, 0.0], [c]], [[0.0], [0.0]]], 2))


def test_normalize_per_task_statistics_and_independence():
    lengths = [[1, 6, 3], [6, 2, 4]]
    mask = mask_of(lengths, 6)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(2, 6, 3, generator=g, dtype=torch.float64) * 3 + 7  # garbage under the mask too
    out = normalize_advantages(adv, mask)
    assert (out[mask == 0] == 0).all()
    for i in range(2):
        real = out[i][mask[i] > 0]
        assert_close(real.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
        assert_close(real.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
    # tasks are independent: changing task 1 leaves task 0 unchanged
    adv2 = adv.clone()
    adv2[1] = adv2[1] * 50 - 3
    out2 = normalize_advantages(adv2, mask)
    assert torch.equal(out2[0], out[0])
    assert_close(normalize_advantages(adv[:1], mask[:1]), out[:1])


# ------------------------------------------------------------------------------------------
# Linear feature baseline
# ------------------------------------------------------------------------------------------


def test_features_layout():
    # H = 3, E = 2, obs_dim = 2; lengths [3, 1]; F = 2*2 + 4 = 8
    obs = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    obs[0, :, 0] = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    obs[0, :, 1] = torch.tensor([[-2.0, 4.0], [GARBAGE, GARBAGE], [float("inf"), float("nan")]], dtype=torch.float64)
    feats = LinearFeatureBaseline().features(obs, mask_of([[3, 1]], 3))
    assert feats.shape == (1, 3, 2, 8)
    #              o          o**2        t      t**2    t**3      1
    expected_e0 = [
        [1.0, 2.0, 1.0, 4.0, 0.00, 0.0000, 0.000000, 1.0],
        [3.0, -1.0, 9.0, 1.0, 0.01, 0.0001, 0.000001, 1.0],
        [0.5, 0.0, 0.25, 0.0, 0.02, 0.0004, 0.000008, 1.0],
    ]
    expected_e1 = [
        [-2.0, 4.0, 4.0, 16.0, 0.0, 0.0, 0.0, 1.0],
        [0.0] * 8,  # masked: zero rows, whatever the observation
        [0.0] * 8,
    ]
    assert_close(feats[0, :, 0], torch.tensor(expected_e0, dtype=torch.float64))
    assert_close(feats[0, :, 1], torch.tensor(expected_e1, dtype=torch.float64))


def test_final_features_use_episode_length_as_time():
    final_obs = torch.tensor([[[5.0, -1.0], [0.0, 2.0]]], dtype=torch.float64)  # [1, 2, 2]
    feats = LinearFeatureBaseline().final_features(final_obs, torch.tensor([[3, 150]]))
    expected = [[5.0, -1.0, 25.0, 1.0, 0.03, 0.0009, 0.000027, 1.0], [0.0, 2.0, 0.0, 4.0, 1.5, 2.25, 3.375, 1.0]]
    assert_close(feats, torch.tensor([expected], dtype=torch.float64))
    # time_offset shifts the time index per episode: same as final_features
    offset = LinearFeatureBaseline().features(
        final_obs.unsqueeze(1), torch.ones(1, 1, 2), time_offset=torch.tensor([[3, 150]])
    )
    assert_close(offset.squeeze(1), feats)


def linear_returns(ep: Episodes, weights: torch.Tensor) -> torch.Tensor:
    """Returns that are exactly ``features . weights`` on the real steps: ``[N, H, E]``."""
    return torch.einsum("nhef,nf->nhe", LinearFeatureBaseline().features(ep.observations, ep.mask), weights)


def test_fit_recovers_exact_linear_weights():
    ep = random_episodes([[30, 12, 25, 30], [7, 30, 30, 19], [30, 30, 30, 30]], horizon=30, obs_dim=2, seed=6)
    g = torch.Generator().manual_seed(7)
    w_true = torch.randn(3, 8, generator=g, dtype=torch.float64)
    baseline = LinearFeatureBaseline(reg_coeff=0.0)
    w = baseline.fit(ep, linear_returns(ep, w_true))
    assert w.shape == (3, 8) and w.dtype == torch.float64
    assert_close(w, w_true, rtol=1e-6, atol=1e-6)
    values, final_values = baseline.values(ep, w)
    assert_close(values, linear_returns(ep, w_true))
    expected_final = torch.einsum("nef,nf->ne", baseline.final_features(ep.final_observations, ep.lengths), w_true)
    assert_close(final_values, expected_final)
    # the default small ridge term barely moves the fitted values (the t**3 weight itself is poorly
    # determined on t <= 0.29, so the ridge may move it a lot)
    ridge = LinearFeatureBaseline()
    ridge_values, _ = ridge.values(ep, ridge.fit(ep, linear_returns(ep, w_true)))
    assert_close(ridge_values, linear_returns(ep, w_true), rtol=0, atol=1e-3)


def test_fit_ignores_masked_steps_and_is_per_task():
    ep = random_episodes([[3, 8, 5], [8, 1, 6]], horizon=8, obs_dim=3, seed=8)
    returns = discounted_returns(ep.rewards, ep.mask, 0.99)
    baseline = LinearFeatureBaseline()
    w = baseline.fit(ep, returns)
    pad_mask = ep.mask == 0
    noisy_obs = ep.observations.clone()
    noisy_obs[pad_mask] = torch.tensor([GARBAGE, -1e6, float("nan")], dtype=torch.float64)
    noisy_returns = torch.where(pad_mask, 1e9, returns)
    w_noisy = baseline.fit(ep._replace(observations=noisy_obs), noisy_returns)
    assert torch.equal(w_noisy, w)
    values, _ = baseline.values(ep._replace(observations=noisy_obs), w)
    assert (values[pad_mask] == 0).all()
    # per task: fitting one task alone gives that task's weights
    for i in range(2):
        assert_close(baseline.fit(ep.task(i), returns[i : i + 1]), w[i : i + 1])


def test_fit_retries_with_larger_reg_when_singular():
    # observation dim 1 is always 0 -> its o and o**2 columns are 0 -> X^T X is singular (task 0 only)
    ep = random_episodes([[6, 4, 6], [6, 6, 2]], horizon=6, obs_dim=2, seed=9)
    obs = ep.observations.clone()
    obs[0, :, :, 1] = 0.0
    ep = ep._replace(observations=obs)
    g = torch.Generator().manual_seed(10)
    w_true = torch.randn(2, 8, generator=g, dtype=torch.float64)
    w_true[0, [1, 3]] = 0.0
    returns = linear_returns(ep, w_true)
    baseline = LinearFeatureBaseline(reg_coeff=0.0)
    x = baseline.features(ep.observations, ep.mask)
    _, info = torch.linalg.solve_ex(torch.einsum("nhef,nheg->nfg", x, x), torch.zeros(2, 8, 1, dtype=torch.float64))
    assert info[0] != 0 and info[1] == 0  # task 0 really is singular at reg 0, task 1 is not
    w = baseline.fit(ep, returns)
    assert torch.isfinite(w).all()
    assert w[0, 1] == 0 and w[0, 3] == 0  # the zero columns get zero weight
    values, _ = baseline.values(ep, w)
    assert_close(values[0], returns[0], rtol=0, atol=1e-4)
    # task 1 was not regularised: it recovers its weights exactly
    assert_close(w[1], w_true[1], rtol=1e-6, atol=1e-6)


def test_fit_solves_a_batch_of_ant_sized_systems_as_one_at_a_time():
    """A batched LU solve of such systems fails inside MKL with 2 threads (torch 2.13 CPU); the
    fit solves them all, as each task alone would, and as the normal equations say."""
    ep = random_episodes([[40, 25, 40], [40, 40, 12], [33, 40, 40]], horizon=40, obs_dim=105, seed=40)
    obs = ep.observations.clone()
    obs[..., 60:] = 0.0  # Ant's contact forces: mostly exact zeros, so many features are 0
    ep = ep._replace(observations=obs * ep.mask.unsqueeze(-1))
    returns = discounted_returns(ep.rewards, ep.mask, 0.99)
    baseline = LinearFeatureBaseline()
    w = baseline.fit(ep, returns)
    for i in range(3):
        assert_close(w[i : i + 1], baseline.fit(ep.task(i), returns[i : i + 1]))
        x = baseline.features(ep.task(i).observations, ep.task(i).mask).reshape(-1, w.shape[1])
        normal = x.T @ x + 1e-5 * torch.eye(w.shape[1], dtype=x.dtype)
        assert_close(normal @ w[i], x.T @ returns[i].reshape(-1), rtol=1e-6, atol=1e-6)


def test_fit_raises_after_retries(monkeypatch):
    calls = []

    def never_finite(a, b, *, symmetric):
        calls.append(a.clone())
        return torch.full_like(b, float("nan")), torch.zeros(a.shape[0], dtype=torch.int32)

    monkeypatch.setattr(value_baselines, "_solve", never_finite)
    ep = random_episodes([[3, 3]], horizon=3, seed=11)
    with pytest.raises(RuntimeError, match=r"not finite for tasks \[0\] after 5 retries"):
        LinearFeatureBaseline(reg_coeff=1e-5).fit(ep, discounted_returns(ep.rewards, ep.mask, 0.9))
    assert len(calls) == MAX_REG_RETRIES + 1
    # reg goes 1e-5, 1e-4, ..., 1e0 on the diagonal
    diag_extra = [float(c[0, -1, -1] - calls[0][0, -1, -1]) for c in calls]
    assert_close(
        torch.tensor(diag_extra), torch.tensor([0.0, 9e-5, 9.9e-4, 9.99e-3, 9.999e-2, 0.99999]), rtol=1e-6, atol=1e-12
    )


# ------------------------------------------------------------------------------------------
# Episodes container
# ------------------------------------------------------------------------------------------


def test_episodes_sizes_and_statistics():
    ep = random_episodes([[1, 3], [2, 3], [3, 3]], horizon=3, act_dim=None, seed=12)
    assert (ep.num_tasks, ep.horizon, ep.episodes_per_task) == (3, 3, 2)
    assert ep.num_steps() == 15
    rews = per_episode(ep.rewards, ep.lengths)
    expected = torch.tensor([[sum(r) for r in task] for task in rews], dtype=torch.float64)
    assert_close(ep.returns_per_episode(), expected)
    assert ep.mean_return() == pytest.approx(float(expected.mean()))
    one = ep.task(-1)
    assert one.num_tasks == 1 and torch.equal(one.rewards, ep.rewards[2:3])
    assert ep.task(slice(0, 2)).num_tasks == 2
    with pytest.raises(IndexError, match="task index 3 out of range for a batch of 3 tasks"):
        ep.task(3)
    moved = ep.to("cpu")
    assert moved.success is None and all(torch.equal(a, b) for a, b in zip(moved[:-1], ep[:-1]))


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("rewards", lambda ep: ep.rewards[:, :2], r"rewards has shape \(2, 2, 3\), expected \(2, 3, 3\)"),
        ("log_probs", lambda ep: ep.log_probs[:, :, :2], r"log_probs has shape \(2, 3, 2\)"),
        ("mask", lambda ep: ep.mask[:1], r"mask has shape \(1, 3, 3\)"),
        (
            "final_observations",
            lambda ep: ep.final_observations[..., :1],
            r"final_observations has shape \(2, 3, 1\), expected \(2, 3, 2\)",
        ),
        ("terminated", lambda ep: ep.terminated[:, :2], r"terminated has shape \(2, 2\)"),
        ("lengths", lambda ep: ep.lengths[:1], r"lengths has shape \(1, 3\)"),
        ("actions", lambda ep: ep.actions[:, 1:], r"actions has shape \(2, 2, 3, 1\)"),
        (
            "observations",
            lambda ep: ep.observations[0],
            r"observations must be \[N, H, E, obs_dim\], got shape \(3, 3, 2\)",
        ),
        ("terminated", lambda ep: ep.terminated.float(), "terminated must be a bool tensor"),
        ("lengths", lambda ep: ep.lengths + 1, r"lengths disagree with mask.sum\(1\) at \[task, episode\] = \[0, 0\]"),
        ("mask", lambda ep: ep.mask.flip(1), "mask must be a prefix along H"),
    ],
)
def test_check_rejects_inconsistent_fields(field, bad, message):
    ep = random_episodes([[1, 3, 2], [3, 3, 2]], horizon=3, seed=13)
    assert ep.check() is ep
    with pytest.raises(ValueError, match=message):
        ep._replace(**{field: bad(ep)}).check()


def test_cat_concatenates_tasks_and_rejects_mismatches():
    a = random_episodes([[1, 3]], horizon=3, seed=14)
    b = random_episodes([[2, 2], [3, 1]], horizon=3, seed=15)
    c = Episodes.cat([a, b]).check()
    assert c.num_tasks == 3
    for name in Episodes._fields[:-1]:
        assert torch.equal(getattr(c, name), torch.cat([getattr(a, name), getattr(b, name)]))
    assert c.success is None
    flags = Episodes.cat([a._replace(success=torch.ones(1, 2)), b._replace(success=torch.zeros(2, 2))]).check()
    assert flags.success.tolist() == [[1, 1], [0, 0], [0, 0]]
    with pytest.raises(ValueError, match="with and without success"):
        Episodes.cat([a._replace(success=torch.ones(1, 2)), b])
    long = random_episodes([[4, 4]], horizon=4, seed=16)
    with pytest.raises(ValueError, match="episodes\\[0\\] has H=3, episodes\\[2\\] has H=4"):
        Episodes.cat([a, b, long])
    with pytest.raises(ValueError, match="E=2, episodes\\[1\\] has E=1"):
        Episodes.cat([a, random_episodes([[3]], horizon=3, seed=17)])
    with pytest.raises(ValueError, match="empty"):
        Episodes.cat([])


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_compute_advantages_is_the_composition_of_the_pieces(normalize, bootstrap):
    ep = random_episodes([[5, 2, 7, 7], [7, 1, 4, 6], [3, 7, 7, 7]], horizon=7, obs_dim=3, seed=18, dtype=torch.float32)
    baseline = LinearFeatureBaseline()
    gamma, lam = 0.99, 0.95
    got = compute_advantages(
        ep, baseline, gamma=gamma, gae_lambda=lam, normalize=normalize, bootstrap_truncated=bootstrap
    )
    assert got.shape == (3, 7, 4) and got.dtype == torch.float32
    assert (got[ep.mask == 0] == 0).all()
    expected = []
    for i in range(ep.num_tasks):  # one task at a time, from the pieces
        t = ep.task(i)
        returns = discounted_returns(t.rewards, t.mask, gamma)
        if bootstrap:
            weights = baseline.fit(t, returns, bootstrap_discounts=bootstrap_discounts(t, gamma))
            terminated = t.terminated
        else:
            weights = baseline.fit(t, returns)
            terminated = torch.ones_like(t.terminated)
        values, final_values = baseline.values(t, weights)
        adv = gae(t.rewards, values, t.mask, terminated=terminated, final_values=final_values, gamma=gamma, lam=lam)
        expected.append(normalize_advantages(adv, t.mask) if normalize else adv)
    assert_close(got, torch.cat(expected))


def test_bootstrap_discounts_by_hand():
    ep = random_episodes([[3, 1, 2]], horizon=3, seed=30)
    ep = ep._replace(terminated=torch.tensor([[False, False, True]]))
    got = bootstrap_discounts(ep, 0.5)
    # episode 0 (L=3, truncated): 0.5^3, 0.5^2, 0.5; episode 1 (L=1): 0.5, 0, 0; episode 2 terminated: 0
    want = torch.tensor([[[0.125, 0.5, 0.0], [0.25, 0.0, 0.0], [0.5, 0.0, 0.0]]], dtype=torch.float64)
    assert_close(got, want)


def test_by_default_no_value_follows_an_episodes_last_step():
    """The horizon is part of the task: with lambda 1 the advantage is the finite-horizon return
    minus the baseline fitted to it, whatever the final observation or the termination flag."""
    ep = random_episodes([[6, 6, 3, 6], [2, 6, 6, 5]], horizon=6, obs_dim=2, seed=31)
    baseline = LinearFeatureBaseline()
    gamma = 0.9
    got = compute_advantages(ep, baseline, gamma=gamma, gae_lambda=1.0, normalize=False)
    returns = torch.zeros_like(ep.rewards)  # by hand, backwards within each episode
    for n in range(2):
        for e in range(4):
            g = 0.0
            for t in range(int(ep.lengths[n, e]) - 1, -1, -1):
                g = float(ep.rewards[n, t, e]) + gamma * g
                returns[n, t, e] = g
    values, _ = baseline.values(ep, baseline.fit(ep, returns))
    assert_close(got, (returns - values) * ep.mask)
    moved = ep._replace(final_observations=ep.final_observations + 100.0, terminated=~ep.terminated)
    assert_close(compute_advantages(moved, baseline, gamma=gamma, gae_lambda=1.0, normalize=False), got)


def test_bootstrapped_baseline_is_fitted_to_its_own_bootstrapped_returns():
    """With a time limit outside the task, truncated episodes continue with V(final observation),
    and the baseline's weights reproduce themselves when refitted (plain ridge) to those targets."""
    ep = random_episodes([[6, 6, 3, 6], [2, 6, 6, 5]], horizon=6, obs_dim=2, seed=32)
    ep = ep._replace(terminated=torch.tensor([[False, False, True, False], [True, False, False, True]]))
    baseline = LinearFeatureBaseline(reg_coeff=1e-3)
    gamma = 0.9
    returns = discounted_returns(ep.rewards, ep.mask, gamma)
    w = baseline.fit(ep, returns, bootstrap_discounts=bootstrap_discounts(ep, gamma))
    values, final_values = baseline.values(ep, w)
    targets = returns.clone()
    for n in range(2):
        for e in range(4):
            length = int(ep.lengths[n, e])
            if not ep.terminated[n, e]:
                for t in range(length):
                    targets[n, t, e] += gamma ** (length - t) * final_values[n, e]
    assert_close(baseline.fit(ep, targets), w)  # a fixed point of the ridge regression
    assert not torch.allclose(baseline.fit(ep, returns), w)  # and not the plain fit
    got = compute_advantages(ep, baseline, gamma=gamma, gae_lambda=1.0, normalize=False, bootstrap_truncated=True)
    assert_close(got, (targets - values) * ep.mask)  # lambda 1: bootstrapped return minus the baseline
