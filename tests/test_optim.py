"""Tests for metarl.core.trpo: the conjugate-gradient / HVP / trust-region pieces of a TRPO step.

Everything runs in float64 with hand-written references: the Hessian of
``0.5 x^T A x + sum(x^4)`` is ``A + diag(12 x^2)``, CG is compared with a direct solve, and the
line search with an independently written "first acceptable fraction" rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarl.core.trpo import (
    LineSearchResult,
    conjugate_gradient,
    flatten,
    line_search,
    make_hvp,
    trpo_step_size,
    unflatten,
)


def random_spd(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned random symmetric positive-definite float64 matrix."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


class CountingMatvec:
    """``v -> A v`` that counts its calls."""

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a @ v


# ------------------------------------------------------------------------------------------
# flatten / unflatten
# ------------------------------------------------------------------------------------------


def test_flatten_unflatten_round_trip():
    params = {
        "w": torch.arange(6.0).reshape(2, 3),
        "b": torch.tensor([10.0, 11.0]),
        "s": torch.tensor(12.0),
    }
    flat = flatten(params)
    assert flat.shape == (9,)
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0, 12.0]  # dict order
    back = unflatten(flat, params)
    assert list(back) == ["w", "b", "s"]
    for name, p in params.items():
        assert back[name].shape == p.shape
        assert torch.equal(back[name], p)
    # A fresh vector takes the shapes of `like` but keeps its own values.
    other = unflatten(torch.arange(9.0) * -1, params)
    assert torch.equal(other["b"], torch.tensor([-6.0, -7.0]))
    assert other["s"].shape == ()


def test_flatten_is_differentiable_and_empty_dict():
    x = torch.ones(2, 2, requires_grad=True)
    flatten({"x": x}).sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 2))
    assert flatten({}).shape == (0,)
    assert unflatten(torch.zeros(0), {}) == {}


def test_unflatten_wrong_length_names_both_sizes():
    like = {"w": torch.zeros(2, 5), "b": torch.zeros(3)}  # 13 elements
    with pytest.raises(ValueError, match=r"vector has 7 elements .* hold 13"):
        unflatten(torch.zeros(7), like)
    with pytest.raises(ValueError, match=r"1-D vector, got shape \(13, 1\)"):
        unflatten(torch.zeros(13, 1), like)


# ------------------------------------------------------------------------------------------
# conjugate_gradient
# ------------------------------------------------------------------------------------------


def test_conjugate_gradient_solves_spd_system():
    a = random_spd(6, seed=0)
    b = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    matvec = CountingMatvec(a)
    x = conjugate_gradient(matvec, b, iterations=6, residual_tol=1e-30)
    assert matvec.calls <= 6
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-6, rtol=0)


def test_conjugate_gradient_stops_early():
    b = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    # A = I: the first step is exact, so one matvec and then r.r = 0 < tol.
    identity = CountingMatvec(torch.eye(3, dtype=torch.float64))
    x = conjugate_gradient(identity, b, iterations=10)
    assert identity.calls == 1
    assert torch.equal(x, b)
    # b = 0: x = 0 is already the solution; no matvec, and no 0/0.
    zero = CountingMatvec(random_spd(3, seed=2))
    x = conjugate_gradient(zero, torch.zeros(3, dtype=torch.float64), iterations=10)
    assert zero.calls == 0
    assert torch.equal(x, torch.zeros(3, dtype=torch.float64))
    # A = 2 I, iterations cap the number of calls even with residual_tol = 0.
    capped = CountingMatvec(random_spd(6, seed=3))
    conjugate_gradient(capped, torch.ones(6, dtype=torch.float64), iterations=2, residual_tol=0.0)
    assert capped.calls == 2


def test_conjugate_gradient_tracks_no_gradients():
    a = random_spd(4, seed=4)
    b = torch.ones(4, dtype=torch.float64, requires_grad=True)
    x = conjugate_gradient(lambda v: a @ v, b * 2)
    assert not x.requires_grad
    torch.testing.assert_close(x, torch.linalg.solve(a, 2 * torch.ones(4, dtype=torch.float64)))


def test_conjugate_gradient_rejects_bad_input():
    with pytest.raises(ValueError, match=r"p.Ap = -1 .* increase the damping"):
        conjugate_gradient(lambda v: -v, torch.ones(1))
    with pytest.raises(ValueError, match=r"iterations must be >= 1, got 0"):
        conjugate_gradient(lambda v: v, torch.ones(1), iterations=0)
    with pytest.raises(ValueError, match=r"residual_tol must be >= 0, got -1"):
        conjugate_gradient(lambda v: v, torch.ones(1), residual_tol=-1.0)


# ------------------------------------------------------------------------------------------
# make_hvp
# ------------------------------------------------------------------------------------------

A6 = random_spd(6, seed=5)


def quadratic_plus_quartic(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """f(x) = 0.5 x^T A x + sum(x^4), x = flatten(params); Hessian A + diag(12 x^2)."""
    x = flatten(params)
    return 0.5 * x @ A6 @ x + (x**4).sum()


def leaf_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_(),
        "b": torch.randn(2, generator=g, dtype=torch.float64).requires_grad_(),
    }


def test_make_hvp_matches_hand_written_hessian():
    params = leaf_params(seed=6)
    damping = 0.1
    hvp = make_hvp(quadratic_plus_quartic, params, damping=damping)
    x = flatten(params).detach()
    hessian = A6 + torch.diag(12 * x**2)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # the graph is retained: repeated calls work and agree
        v = torch.randn(6, generator=g, dtype=torch.float64)
        hv = hvp(v)
        assert not hv.requires_grad
        torch.testing.assert_close(hv, hessian @ v + damping * v, atol=1e-10, rtol=0)
    # Same product under no_grad (as inside conjugate_gradient).
    with torch.no_grad():
        torch.testing.assert_close(hvp(v), hessian @ v + damping * v, atol=1e-10, rtol=0)


def test_make_hvp_matches_finite_difference_of_gradient():
    params = leaf_params(seed=8)
    like = {k: p.detach() for k, p in params.items()}

    def gradient(x: torch.Tensor) -> torch.Tensor:
        leaves = {k: p.clone().requires_grad_() for k, p in unflatten(x, like).items()}
        return flatten(dict(zip(leaves, torch.autograd.grad(quadratic_plus_quartic(leaves), list(leaves.values())))))

    hvp = make_hvp(quadratic_plus_quartic, params, damping=0.0)
    x = flatten(like)
    v = torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eps = 1e-5
    finite_difference = (gradient(x + eps * v) - gradient(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(hvp(v), finite_difference, atol=1e-7, rtol=0)


def test_make_hvp_with_conjugate_gradient_solves_damped_system():
    params = leaf_params(seed=10)
    damping = 0.5
    hvp = make_hvp(quadratic_plus_quartic, params, damping=damping)
    x = flatten(params).detach()
    hessian = A6 + torch.diag(12 * x**2) + damping * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    solution = conjugate_gradient(hvp, b, iterations=6, residual_tol=1e-30)
    torch.testing.assert_close(solution, torch.linalg.solve(hessian, b), atol=1e-6, rtol=0)


def test_make_hvp_linear_and_unused_parameters():
    params = leaf_params(seed=12)
    v = torch.arange(1.0, 7.0, dtype=torch.float64)
    # Linear in the parameters: H = 0, only damping remains.
    linear = make_hvp(lambda p: 3 * p["w"].sum() - p["b"].sum(), params, damping=0.25)
    assert torch.equal(linear(v), 0.25 * v)
    # "b" unused: its rows of H are zero; "w" rows are d^2/dw^2 of sum(w^2) = 2 I.
    only_w = make_hvp(lambda p: (p["w"] ** 2).sum(), params, damping=0.0)
    expected = torch.tensor([2.0, 4.0, 6.0, 8.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(only_w(v), expected)


def test_make_hvp_rejects_bad_input():
    params = leaf_params(seed=13)
    with pytest.raises(ValueError, match=r"damping must be finite and >= 0, got -0.1"):
        make_hvp(quadratic_plus_quartic, params, damping=-0.1)
    frozen = {"w": params["w"], "b": params["b"].detach()}
    with pytest.raises(ValueError, match=r"parameter 'b' does not require grad"):
        make_hvp(quadratic_plus_quartic, frozen, damping=0.0)
    hvp = make_hvp(quadratic_plus_quartic, params, damping=0.0)
    with pytest.raises(ValueError, match=r"vector of 6 elements, got shape \(5,\)"):
        hvp(torch.zeros(5, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# trpo_step_size
# ------------------------------------------------------------------------------------------


def test_trpo_step_size_identity_fisher():
    d = torch.tensor([0.6, 0.0, -0.8], dtype=torch.float64)  # |d| = 1
    beta = trpo_step_size(d, d.clone(), max_kl=0.01)  # F = I
    assert beta.shape == ()
    assert beta.item() == pytest.approx(math.sqrt(2 * 0.01), rel=1e-15)


def test_trpo_step_size_hits_the_quadratic_trust_region():
    fisher = random_spd(5, seed=14)
    d = torch.randn(5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    beta = trpo_step_size(d, fisher @ d, max_kl=0.03)
    step = beta * d
    assert (0.5 * step @ fisher @ step).item() == pytest.approx(0.03, rel=1e-12)


def test_trpo_step_size_rejects_non_positive_curvature():
    d = torch.ones(3)
    with pytest.raises(ValueError, match=r"d\^T F d = 0; it must be finite and > 0"):
        trpo_step_size(torch.zeros(3), torch.zeros(3), max_kl=0.01)
    with pytest.raises(ValueError, match=r"d\^T F d = -3"):
        trpo_step_size(d, -d, max_kl=0.01)
    with pytest.raises(ValueError, match=r"d\^T F d = nan"):
        trpo_step_size(d, torch.full((3,), math.nan), max_kl=0.01)
    with pytest.raises(ValueError, match=r"max_kl must be finite and > 0, got 0"):
        trpo_step_size(d, d, max_kl=0.0)
    with pytest.raises(ValueError, match=r"shape \(3,\) but fvp_direction has \(2,\)"):
        trpo_step_size(d, torch.ones(2), max_kl=0.01)


# ------------------------------------------------------------------------------------------
# line_search
# ------------------------------------------------------------------------------------------

FULL_STEP = torch.tensor([3.0, -4.0], dtype=torch.float64)  # |full step| = 5


class Recorder:
    """An ``evaluate`` built from ``fn(fraction) -> (loss, kl)`` that records the fractions."""

    def __init__(self, fn):
        self.fn = fn
        self.fractions: list[float] = []

    def __call__(self, step: torch.Tensor) -> tuple[float, float]:
        fraction = (step.norm() / FULL_STEP.norm()).item()
        self.fractions.append(fraction)
        return self.fn(fraction)


def test_line_search_accepts_full_step():
    evaluate = Recorder(lambda f: (0.5, 0.005))
    result = line_search(evaluate, FULL_STEP, loss_before=1.0, max_kl=0.01)
    assert isinstance(result, LineSearchResult)
    assert result.accepted is True
    assert result.fraction == 1.0
    assert result.steps_taken == 1
    assert torch.equal(result.step, FULL_STEP)
    assert (result.loss, result.kl) == (0.5, 0.005)
    assert evaluate.fractions == [1.0]


def test_line_search_backtracks_to_the_trust_region():
    # KL grows quadratically with the step: kl(f) = f^2. With max_kl = 0.3 the fractions
    # 1, 0.8, 0.64 give 1, 0.64, 0.4096 (too far) and 0.8**3 gives 0.262144 (inside).
    evaluate = Recorder(lambda f: (-f, f**2))
    result = line_search(evaluate, FULL_STEP, loss_before=0.0, max_kl=0.3, ratio=0.8)
    assert result.accepted
    assert result.fraction == 0.8**3
    assert result.steps_taken == 4
    torch.testing.assert_close(result.step, 0.8**3 * FULL_STEP, atol=0, rtol=0)
    assert result.kl == pytest.approx(0.8**6)
    assert result.loss == pytest.approx(-(0.8**3))
    assert evaluate.fractions == pytest.approx([1.0, 0.8, 0.64, 0.512])


def test_line_search_backtracks_past_an_overshoot():
    # loss(f) = f (f - 0.7): worse than 0 at f = 1 and 0.8, better at 0.64.
    result = line_search(Recorder(lambda f: (f * (f - 0.7), 0.0)), FULL_STEP, loss_before=0.0, max_kl=0.01)
    assert (result.accepted, result.fraction, result.steps_taken) == (True, 0.8**2, 3)


def test_line_search_rejects_when_nothing_improves():
    evaluate = Recorder(lambda f: (1.0, 0.0))  # equal loss is not an improvement
    result = line_search(evaluate, FULL_STEP, loss_before=1.0, max_kl=0.01, max_steps=7)
    assert result.accepted is False
    assert torch.equal(result.step, torch.zeros(2, dtype=torch.float64))
    assert result.fraction == 0.0
    assert result.steps_taken == 7
    assert (result.loss, result.kl) == (1.0, 0.0)
    assert evaluate.fractions == pytest.approx([0.8**k for k in range(7)])


@pytest.mark.parametrize("bad", [(math.nan, 0.0), (0.0, math.nan), (-math.inf, 0.0), (0.0, math.inf), (0.0, 0.0100001)])
def test_line_search_skips_non_finite_or_too_large_kl(bad):
    # The first evaluation is bad; the second one is fine and must be the one accepted.
    answers = iter([bad, (0.5, 0.01)])
    result = line_search(lambda s: next(answers), FULL_STEP, loss_before=1.0, max_kl=0.01)
    assert (result.accepted, result.steps_taken, result.fraction) == (True, 2, 0.8)
    assert (result.loss, result.kl) == (0.5, 0.01)


def test_line_search_property_never_accepts_a_bad_step():
    rng = np.random.default_rng(16)
    pool = [math.nan, math.inf, -math.inf]
    accepted_count = 0
    for _ in range(300):
        max_kl = float(rng.uniform(0.001, 0.1))
        ratio = float(rng.uniform(0.1, 0.95))
        max_steps = int(rng.integers(1, 9))
        loss_before = float(rng.normal())
        answers = []
        for _ in range(max_steps):
            loss = float(rng.normal()) if rng.random() < 0.7 else pool[rng.integers(3)]
            kl = float(rng.uniform(0, 2 * max_kl)) if rng.random() < 0.8 else pool[rng.integers(3)]
            answers.append((loss, kl))
        full_step = torch.from_numpy(rng.normal(size=3))
        seen: list[torch.Tensor] = []

        def evaluate(step, answers=answers, seen=seen):
            seen.append(step)
            return answers[len(seen) - 1]

        result = line_search(
            evaluate, full_step, loss_before=loss_before, max_kl=max_kl, ratio=ratio, max_steps=max_steps
        )
        # Reference rule, written independently: the first finite, improving, in-region answer.
        good = [
            i
            for i, (loss, kl) in enumerate(answers)
            if not math.isnan(loss)
            and not math.isnan(kl)
            and abs(loss) != math.inf
            and abs(kl) != math.inf
            and loss < loss_before
            and kl <= max_kl
        ]
        assert result.steps_taken == len(seen)
        for k, step in enumerate(seen):
            torch.testing.assert_close(step, ratio**k * full_step, atol=0, rtol=0)
        if good:
            accepted_count += 1
            k = good[0]
            assert result.accepted and result.steps_taken == k + 1
            assert result.fraction == ratio**k
            assert (result.loss, result.kl) == answers[k]
            assert math.isfinite(result.kl) and result.kl <= max_kl
            assert math.isfinite(result.loss) and result.loss < loss_before
        else:
            assert not result.accepted and result.steps_taken == max_steps
            assert torch.equal(result.step, torch.zeros(3, dtype=torch.float64))
            assert (result.fraction, result.loss, result.kl) == (0.0, loss_before, 0.0)
    assert 50 < accepted_count < 290  # both branches are exercised


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"ratio must be in the open interval \(0, 1\), got 0.0"),
        ({"ratio": 1.0}, r"ratio must be in the open interval \(0, 1\), got 1.0"),
        ({"ratio": -0.5}, r"got -0.5"),
        ({"ratio": math.nan}, r"ratio .* got nan"),
        ({"max_steps": 0}, r"max_steps must be an integer >= 1, got 0"),
        ({"max_steps": 2.5}, r"max_steps must be an integer >= 1, got 2.5"),
        ({"max_kl": 0.0}, r"max_kl must be finite and > 0, got 0.0"),
        ({"max_kl": -0.01}, r"max_kl must be finite and > 0, got -0.01"),
        ({"max_kl": math.inf}, r"max_kl must be finite and > 0, got inf"),
    ],
)
def test_line_search_rejects_bad_options(kwargs, message):
    options = {"loss_before": 0.0, "max_kl": 0.01} | kwargs
    calls = []
    with pytest.raises(ValueError, match=message):
        line_search(lambda s: calls.append(s) or (0.0, 0.0), FULL_STEP, **options)
    assert calls == []  # validated before any evaluation
