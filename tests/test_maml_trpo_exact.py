"""The MAML-TRPO meta-update against references written here from the definitions.

Finn et al. (2017), MAML with a TRPO outer step: per task ``i`` the inner step is REINFORCE,
``phi_i = theta - lr * grad L_i(theta)`` with ``L_i = -sum(mask * log pi * A) / sum(mask)``; the
outer surrogate is ``mean_i -sum(mask * exp(log pi_phi_i - log pi_old) * A) / sum(mask)`` and the
trust region the mean over tasks of the masked mean ``KL(pi_phi_i(theta_old) || pi_phi_i(theta))``.
TRPO (Schulman et al., 2015): ``x = F^-1 g`` with ``F`` the Hessian of that KL at ``theta_old``,
full step ``-beta x`` with ``0.5 (beta x)^T F (beta x) = max_kl``, then backtracking.

Everything the learner computes is checked against code in this file: the Gaussian policy's
forward pass, log-density and KL are written out, the inner loop is a Python loop over tasks with
plain ``torch.autograd`` (float64), and ``F`` is the full Hessian of the reference KL
(``torch.autograd.functional.hessian``). Nothing below calls the learner's helpers to compute an
expected value.

The damping: ``MAMLTRPO`` solves ``(F + cg_damping I) x = g`` and scales the step with the same
damped operator; the tests use the default ``cg_damping = 1e-5`` and include it in ``F``.
"""

from __future__ import annotations

import math

import gymnasium as gym
import pytest
import torch
from test_rl import double  # float64 copies of sampled episodes

import agents.maml_trpo as maml_trpo
from agents.maml_trpo import MAMLTRPO
from agents.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl.rl.advantages import compute_advantages
from metarl.rl.episodes import Episodes
from metarl.rl.objective import PolicyGradientObjective, RLBatch, StepData
from metarl.rl.sampling import VectorSampler, task_seeds
from metarl.rl.value_baselines import LinearFeatureBaseline

NAV = "metarl/Navigation2D-v0"
DAMPING = 1e-5  # MAMLTRPO's default cg_damping, used by every learner below
LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- data


def make_batch(*, lrs=(0.5,), n=2, e=4, horizon=10, seed=0, hidden=(4,), **trpo):
    """Real Navigation2D episodes of a tiny Gaussian policy, in float64 (as ``tiny_batch`` in
    tests/test_rl.py, with one sampling phase per inner step): (policy, learner, train, valid).

    Inner step ``s`` uses episodes sampled with the first-order adapted parameters after ``s``
    steps; the validation log-probs are recomputed in float64 under the adapted parameters.
    """
    sampler = VectorSampler(NAV, episodes_per_task=e, horizon=horizon)
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, hidden=hidden, init_std=0.5)
    env = gym.make(NAV)
    env.reset(seed=seed)
    tasks = env.unwrapped.sample_tasks(n)
    baseline = LinearFeatureBaseline()

    def data(ep):
        return StepData(ep, compute_advantages(ep, baseline, gamma=0.99, gae_lambda=1.0, normalize=True))

    learner = MAMLTRPO(policy, inner_lrs=list(lrs), **trpo)
    train: list[StepData] = []
    for s in range(len(lrs) + 1):
        policy.double()
        params = learner.adapt(learner.theta(), train, lrs=lrs[:s], first_order=True) if s else policy.params()
        params = {k: v.detach().float() for k, v in params.items()}
        policy.float()  # theta starts in float32, so the round trip is exact
        ep = double(sampler.sample(policy, params, tasks, task_seeds(seed, s, n=n), per_task=s > 0))
        if s < len(lrs):
            train.append(data(ep))
    policy.double()
    with torch.no_grad():
        phi = learner.adapt(learner.theta(), train, first_order=True)
        log_probs = policy(ep.observations, phi).log_prob(ep.actions) * ep.mask
    valid = data(ep._replace(log_probs=log_probs))
    return policy, learner, train, valid


def flat_params(policy: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in policy.parameters()]).clone()


# ----------------------------------------------------------------------------- the reference


class Reference:
    """MAML-TRPO's objective for a tanh MLP Gaussian policy, written from the definitions.

    Works on a flat parameter vector in the policy's ``named_parameters`` order, one task at a
    time. (The policy clamps ``log_std`` at ``log(min_std)``; the tests stay far above it.)
    """

    def __init__(self, policy: GaussianMLPPolicy, lrs):
        self.shapes = [(name, p.shape) for name, p in policy.named_parameters()]
        self.hidden_layers = len(policy.hidden)
        self.lrs = list(lrs)

    def unflat(self, flat):
        out, i = {}, 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            out[name] = flat[i : i + size].reshape(shape)
            i += size
        return out

    def outputs(self, flat, obs):
        """(mean, log_std) ``[..., act_dim]``."""
        p = self.unflat(flat)
        x = obs
        for l in range(self.hidden_layers):
            x = torch.tanh(x @ p[f"layers.{l}.weight"].T + p[f"layers.{l}.bias"])
        mean = x @ p["out.weight"].T + p["out.bias"]
        return mean, p["log_std"].expand_as(mean)

    @staticmethod
    def log_density(mean, log_std, actions):
        z = (actions - mean) * torch.exp(-log_std)
        return -0.5 * (z**2 + 2 * log_std + LOG_2PI).sum(-1)

    @staticmethod
    def kl(old, new):
        """KL(N(m1, s1) || N(m2, s2)) of diagonal Gaussians, summed over action dimensions."""
        (m1, l1), (m2, l2) = old, new
        return (l2 - l1 + (torch.exp(2 * l1) + (m1 - m2) ** 2) / (2 * torch.exp(2 * l2)) - 0.5).sum(-1)

    def reinforce(self, flat, data: StepData, i: int, episodes: int | None = None):
        """Task ``i``'s REINFORCE loss, on its first ``episodes`` episodes (all by default)."""
        ep = data.episodes
        k = slice(0, episodes)
        mask, adv = ep.mask[i, :, k], data.advantages[i, :, k]
        logp = self.log_density(*self.outputs(flat, ep.observations[i, :, k]), ep.actions[i, :, k])
        return -(mask * logp * adv).sum() / mask.sum()

    def inner_step(self, flat, data, i, lr, *, create_graph=True, episodes=None):
        (g,) = torch.autograd.grad(self.reinforce(flat, data, i, episodes), flat, create_graph=create_graph)
        return flat - lr * g

    def step_jacobian(self, point, data, i, lr, episodes):
        """The Jacobian of one inner step of task ``i`` on its first ``episodes`` episodes, at ``point``."""
        return torch.autograd.functional.jacobian(lambda p: self.inner_step(p, data, i, lr, episodes=episodes), point)

    def output_jacobian(self, point, obs):
        """The Jacobian of the outputs (mean, then log-std, flattened) at ``point``."""
        return torch.autograd.functional.jacobian(
            lambda p: torch.cat([o.reshape(-1) for o in self.outputs(p, obs)]), point
        )

    def adapt(self, theta, train, i, *, first_order=False):
        """Task ``i``'s adapted parameters, differentiable in ``theta`` through every inner step (second order)."""
        with torch.enable_grad():
            phi = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            for data, lr in zip(train, self.lrs):  # first order: the inner gradient as a constant
                phi = self.inner_step(phi, data, i, lr, create_graph=not first_order)
        return phi

    def old(self, theta0, train, valid):
        """The old adapted policies' outputs on each task's validation steps (constants)."""
        n = valid.episodes.num_tasks
        return [
            tuple(o.detach() for o in self.outputs(self.adapt(theta0, train, i), valid.episodes.observations[i]))
            for i in range(n)
        ]

    def surrogate_and_kl(self, theta, train, valid, old, *, first_order=False):
        ep = valid.episodes
        surrogates, kls = [], []
        for i in range(ep.num_tasks):
            phi = self.adapt(theta, train, i, first_order=first_order)
            new = self.outputs(phi, ep.observations[i])
            mask = ep.mask[i]
            ratio = torch.exp(self.log_density(*new, ep.actions[i]) - ep.log_probs[i])
            surrogates.append(-(mask * ratio * valid.advantages[i]).sum() / mask.sum())
            kls.append((mask * self.kl(old[i], new)).sum() / mask.sum())
        return torch.stack(surrogates).mean(), torch.stack(kls).mean()

    def gradient(self, theta, train, valid, old, *, first_order=False):
        theta = theta.detach().requires_grad_(True)
        surrogate, _ = self.surrogate_and_kl(theta, train, valid, old, first_order=first_order)
        return torch.autograd.grad(surrogate, theta)[0]

    def fisher(self, theta0, train, valid, old):
        """The Hessian of the mean KL in ``theta`` at ``theta0`` (through the inner loop)."""
        return torch.autograd.functional.hessian(
            lambda t: self.surrogate_and_kl(t, train, valid, old)[1], theta0.detach().clone()
        )


def trpo_problem(**kwargs):
    """A batch, its reference, ``theta_old``, the old outputs, ``g`` and ``F + damping I``."""
    policy, learner, train, valid = make_batch(**kwargs)
    ref = Reference(policy, learner.inner_lrs)
    theta0 = flat_params(policy)
    old = ref.old(theta0, train, valid)
    g = ref.gradient(theta0, train, valid, old)
    a = ref.fisher(theta0, train, valid, old) + DAMPING * torch.eye(theta0.numel(), dtype=theta0.dtype)
    return policy, learner, train, valid, ref, theta0, old, g, a


class CapturedLineSearch:
    """Stands in for ``agents.maml_trpo.line_search``: records the full step and the result of the
    real line search (optionally with a wrapped ``evaluate``)."""

    def __init__(self, wrap_evaluate=None):
        self.wrap_evaluate = wrap_evaluate
        self.calls = []
        self.evaluated = []
        self.real = maml_trpo.line_search

    def __call__(self, evaluate, full_step, **kwargs):
        def recorded(step):
            self.evaluated.append(step.clone())
            value = evaluate(step)
            return self.wrap_evaluate(value, kwargs) if self.wrap_evaluate else value

        result = self.real(recorded, full_step, **kwargs)
        self.calls.append({"full_step": full_step.detach().clone(), "result": result, **kwargs})
        return result


# ----------------------------------------------------------------------------- 1. the objective


def test_surrogate_kl_and_second_order_meta_gradient_match_the_reference():
    policy, learner, train, valid = make_batch()
    ref = Reference(policy, learner.inner_lrs)
    theta0 = flat_params(policy)
    old = ref.old(theta0, train, valid)
    # the learner's old outputs are the reference's
    for mine, theirs in zip(zip(*old), learner.old_outputs(ref.unflat(theta0), train, valid)):
        torch.testing.assert_close(torch.stack(mine), theirs, rtol=1e-12, atol=1e-12)
    old_batched = tuple(torch.stack(o) for o in zip(*old))
    gen = torch.Generator().manual_seed(0)
    # at theta_old and at a nearby point, where the KL and its gradient are not zero
    for theta in (theta0, theta0 + 0.05 * torch.randn(theta0.shape, generator=gen, dtype=theta0.dtype)):
        t_ref = theta.clone().requires_grad_(True)
        s_ref, kl_ref = ref.surrogate_and_kl(t_ref, train, valid, old)
        gs_ref, gk_ref = (torch.autograd.grad(v, t_ref, retain_graph=True)[0] for v in (s_ref, kl_ref))
        t = {k: v.clone().requires_grad_(True) for k, v in ref.unflat(theta).items()}
        s, kl = learner.surrogate_and_kl(t, train, valid, old_batched)
        gs = torch.cat([x.reshape(-1) for x in torch.autograd.grad(s, list(t.values()), retain_graph=True)])
        gk = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl, list(t.values()))])
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kl, kl_ref, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gs, gs_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gk, gk_ref, rtol=1e-9, atol=1e-12)
    assert kl_ref > 1e-4  # the second point is away from theta_old
    # the second-order term is large here, so a first-order gradient cannot pass the checks above
    g = ref.gradient(theta0, train, valid, old)
    g_fo = ref.gradient(theta0, train, valid, old, first_order=True)
    assert (g - g_fo).norm() > 0.05 * g.norm()


# ----------------------------------------------------------------------------- 2-4. the TRPO step


def test_search_direction_solves_the_damped_fisher_system(monkeypatch):
    policy, learner, train, valid, ref, theta0, old, g, a = trpo_problem(cg_iterations=200)
    capture = CapturedLineSearch()
    monkeypatch.setattr(maml_trpo, "line_search", capture)
    learner.step(RLBatch(train, valid), 0)
    (call,) = capture.calls
    s = call["full_step"]
    # s = -beta x with (F + damping I) x = g, beta > 0: read beta off s, then x solves the system to
    # CG's tolerance (it stops once |residual| < 1e-5; 2e-5 leaves room for rounding in F). Here
    # |g| = 0.9; g itself (no CG) leaves a residual of 20, and the default 10 CG steps 0.05.
    a_s = a @ s
    beta = -(a_s @ g) / (g @ g)
    assert beta > 0
    x = -s / beta
    assert (a @ x - g).norm() <= 2e-5
    # so s is the exact solution's step, up to that tolerance, in the trust region's own norm
    exact_x = torch.linalg.solve(a, g)
    exact = -torch.sqrt(2 * learner.max_kl / (exact_x @ a @ exact_x)) * exact_x
    assert (s - exact) @ a @ (s - exact) <= 1e-4 * (exact @ a @ exact)


@pytest.mark.parametrize("max_kl", [1e-3, 2e-2])
def test_full_step_has_quadratic_kl_exactly_max_kl(monkeypatch, max_kl):
    policy, learner, train, valid, ref, theta0, old, g, a = trpo_problem(max_kl=max_kl)
    capture = CapturedLineSearch()
    monkeypatch.setattr(maml_trpo, "line_search", capture)
    learner.step(RLBatch(train, valid), 0)
    s = capture.calls[0]["full_step"]
    # 0.5 s^T (F + damping I) s = max_kl, F the Hessian of the reference KL (default CG iterations)
    assert float(0.5 * s @ a @ s) == pytest.approx(max_kl, rel=1e-6)
    # a descent direction of the reference surrogate
    assert float(s @ g) < 0


@pytest.mark.parametrize("how", ["max_kl_below_rounding", "no_candidate_lowers_the_loss"])
def test_rejected_line_search_leaves_the_policy_bitwise_unchanged(monkeypatch, how):
    if how == "max_kl_below_rounding":
        # every step whose KL is <= 1e-40 changes no output, so no candidate lowers the loss
        policy, learner, train, valid = make_batch(max_kl=1e-40)
        capture = CapturedLineSearch()
    else:
        # the real line search sees every candidate (the full trust-region step included) fail to improve
        policy, learner, train, valid = make_batch(max_kl=1e-2)
        capture = CapturedLineSearch(lambda value, kw: (kw["loss_before"], value[1]))
    before = [p.detach().clone() for p in policy.parameters()]
    monkeypatch.setattr(maml_trpo, "line_search", capture)
    metrics = learner.step(RLBatch(train, valid), 0)
    (call,) = capture.calls
    assert not call["result"].accepted and metrics["line_search/accepted"] == 0.0
    assert len(capture.evaluated) == learner.line_search_steps == metrics["line_search/steps"]
    assert call["full_step"].abs().max() > 0 and metrics["grad_norm"] > 0
    for p, q in zip(policy.parameters(), before):
        assert torch.equal(p.detach().view(torch.int64), q.view(torch.int64))


def test_accepted_line_search_moves_theta_by_the_accepted_fraction_of_the_full_step(monkeypatch):
    # a large trust region: the full step overshoots and the line search backtracks
    policy, learner, train, valid = make_batch(max_kl=0.5)
    ref = Reference(policy, learner.inner_lrs)
    theta0 = flat_params(policy)
    old = ref.old(theta0, train, valid)
    capture = CapturedLineSearch()
    monkeypatch.setattr(maml_trpo, "line_search", capture)
    metrics = learner.step(RLBatch(train, valid), 0)
    (call,) = capture.calls
    s, result = call["full_step"], call["result"]
    k = metrics["line_search/steps"] - 1
    assert result.accepted and metrics["line_search/accepted"] == 1.0 and k >= 1
    fraction = learner.line_search_ratio**k
    assert metrics["line_search/fraction"] == result.fraction == fraction
    torch.testing.assert_close(flat_params(policy), theta0 + fraction * s, rtol=0, atol=0)
    # the reference agrees: the earlier fractions fail, the accepted one improves inside max_kl
    before = ref.surrogate_and_kl(theta0, train, valid, old)[0].item()
    for j in range(k + 1):
        loss, kl = (
            x.item() for x in ref.surrogate_and_kl(theta0 + learner.line_search_ratio**j * s, train, valid, old)
        )
        assert (loss < before and kl <= learner.max_kl) == (j == k), (j, loss, before, kl)
    assert metrics["loss/surrogate_after"] == pytest.approx(loss, rel=1e-10)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-8)


# ----------------------------------------------------------------------------- 5. REINFORCE by hand


def test_reinforce_inner_loss_against_a_hand_computed_value():
    policy = GaussianMLPPolicy(1, 2, hidden=(1,)).double()
    w0, b0, wo, bo, log_std = 0.5, 0.1, (2.0, -1.0), (-0.3, 0.2), (math.log(0.8), math.log(1.5))
    with torch.no_grad():
        policy.layers[0].weight.fill_(w0)
        policy.layers[0].bias.fill_(b0)
        policy.out.weight.copy_(torch.tensor([[wo[0]], [wo[1]]], dtype=torch.float64))
        policy.out.bias.copy_(torch.tensor(bo, dtype=torch.float64))
        policy.log_std.copy_(torch.tensor(log_std, dtype=torch.float64))
    # 2 tasks, horizon 3, 2 episodes each; task 0's episode 1 ends after one step, task 1's after two.
    # [task][episode] -> (observations, actions, advantages) of the real steps
    steps = [
        [([0.3, -1.2, 0.7], [(0.1, -0.4), (1.3, 0.2), (-0.5, 0.9)], [1.5, -0.5, 0.25]), ([2.0], [(0.0, 1.0)], [-1.0])],
        [
            ([-0.6, 0.4, 1.1], [(0.7, 0.7), (-1.1, 0.3), (0.2, -2.0)], [0.3, 0.8, -1.2]),
            ([0.9, -0.2], [(0.4, -0.6), (2.2, 0.0)], [2.0, -0.7]),
        ],
    ]
    n, h, e = 2, 3, 2
    obs = torch.full((n, h, e, 1), 9.0, dtype=torch.float64)  # junk after an episode's end
    act = torch.full((n, h, e, 2), -7.0, dtype=torch.float64)
    adv = torch.full((n, h, e), 5.0, dtype=torch.float64)
    mask = torch.zeros(n, h, e, dtype=torch.float64)
    for i, task in enumerate(steps):
        for j, (o, a, A) in enumerate(task):
            for t in range(len(o)):
                obs[i, t, j, 0], act[i, t, j] = o[t], torch.tensor(a[t], dtype=torch.float64)
                adv[i, t, j], mask[i, t, j] = A[t], 1.0
    lengths = mask.sum(1).long()
    episodes = Episodes(
        obs,
        act,
        torch.zeros(n, h, e, dtype=torch.float64),
        torch.zeros(n, h, e, dtype=torch.float64),
        mask,
        torch.zeros(n, e, 1, dtype=torch.float64),
        torch.zeros(n, e, dtype=torch.bool),
        lengths,
    ).check()
    assert lengths.tolist() == [[3, 1], [3, 2]]

    def log_density(o, a):  # N(mean, diag(std^2)) with mean = wo * tanh(w0 o + b0) + bo
        hidden = math.tanh(w0 * o + b0)
        total = 0.0
        for d in range(2):
            mean, std = wo[d] * hidden + bo[d], math.exp(log_std[d])
            total += -0.5 * ((a[d] - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
        return total

    expected = 0.0
    for task in steps:
        weighted = sum(log_density(o[t], a[t]) * A[t] for o, a, A in task for t in range(len(o)))
        expected += -weighted / sum(len(o) for o, _, _ in task)
    objective = PolicyGradientObjective(policy)
    data = StepData(episodes, adv)
    assert objective.support_loss(policy.params(), data).item() == pytest.approx(expected, rel=1e-12)
    per_task = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in policy.params().items()}
    assert objective.support_loss(per_task, data).item() == pytest.approx(expected, rel=1e-12)
    # and the per-task value of task 0 alone
    one = StepData(episodes.task(0), adv[:1])
    task0 = -sum(log_density(o[t], a[t]) * A[t] for o, a, A in steps[0] for t in range(len(o))) / 4
    assert objective.support_loss(policy.params(), one).item() == pytest.approx(task0, rel=1e-12)
    # pytorch-maml-rl's form: each episode's mean over its steps, then the mean over the task's episodes
    per_episode = 0.0
    for task in steps:
        means = [sum(log_density(o[t], a[t]) * A[t] for t in range(len(o))) / len(o) for o, a, A in task]
        per_episode += -sum(means) / len(means)
    assert per_episode != pytest.approx(expected, rel=1e-3)  # the lengths differ, so the two forms do
    by_episode = StepData(episodes, adv, "episodes")
    assert objective.support_loss(policy.params(), by_episode).item() == pytest.approx(per_episode, rel=1e-12)
    weights = by_episode.step_weights()  # the same mean as weights of the steps (used by the Fisher products)
    assert weights.sum((1, 2)).tolist() == pytest.approx([1.0, 1.0], rel=1e-12)
    assert weights[1, :, 1].tolist() == pytest.approx([0.25, 0.25, 0.0], rel=1e-12)  # 1 / (E * length 2)


# ----------------------------------------------------------------------------- 6. KL Hessians in the outputs


def categorical_kl(old_logits, new_logits):
    """KL(Categorical(old) || Categorical(new)) from logits."""
    p = torch.softmax(old_logits, -1)
    return (p * (torch.log_softmax(old_logits, -1) - torch.log_softmax(new_logits, -1))).sum(-1)


@pytest.mark.parametrize("policy_cls", [CategoricalMLPPolicy, GaussianMLPPolicy])
def test_kl_hessian_product_equals_the_autograd_hessian_of_the_weighted_kl(policy_cls):
    """``kl_hessian_product(old, v, w)`` is ``H v`` with ``H`` the Hessian of ``sum(w * KL(old || new))``
    in the outputs at ``new = old``, ``w`` per sample ``[N, H, E]`` (MAMLTRPO passes masked means)."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 2, 4)  # [N, H, E, num_actions or act_dim]
    w = torch.rand(shape[:-1], generator=gen, dtype=torch.float64)
    w[0, 2, 1] = 0.0
    if policy_cls is CategoricalMLPPolicy:
        old = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2,)
        kl = lambda o, n: categorical_kl(o[0], n[0])
    else:
        old = tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
        kl = Reference.kl
    sizes = [o.numel() for o in old]

    def weighted_kl(flat):
        new = tuple(x.reshape(shape) for x in torch.split(flat, sizes))
        return (w * kl(old, new)).sum()

    flat_old = torch.cat([o.reshape(-1) for o in old])
    hessian = torch.autograd.functional.hessian(weighted_kl, flat_old)
    for _ in range(3):
        v = torch.randn(flat_old.shape, generator=gen, dtype=torch.float64)
        tangent = tuple(x.reshape(shape) for x in torch.split(v, sizes))
        product = policy_cls.kl_hessian_product(old, tangent, w)
        torch.testing.assert_close(torch.cat([x.reshape(-1) for x in product]), hessian @ v, rtol=1e-10, atol=1e-12)


def test_categorical_policy_fisher_vector_product_equals_the_hessian_of_the_kl():
    """MAMLTRPO's J^T M J with a categorical policy, against the Hessian of a mean KL written here."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    n, h, e, k = 2, 4, 3, 3
    policy = CategoricalMLPPolicy(2, k, hidden=(3,)).double()
    mask = torch.ones(n, h, e, dtype=torch.float64)
    mask[0, 2:, 1] = 0.0
    mask[1, 1:, 0] = 0.0

    def step_data():
        obs = torch.randn(n, h, e, 2, generator=gen, dtype=torch.float64)
        act = torch.randint(0, k, (n, h, e), generator=gen)
        eps = Episodes(
            obs,
            act,
            torch.zeros_like(mask),
            torch.zeros_like(mask),
            mask,
            obs[:, 0],
            torch.zeros(n, e, dtype=torch.bool),
            mask.sum(1).long(),
        ).check()
        return StepData(eps, torch.randn(n, h, e, generator=gen, dtype=torch.float64))

    train, valid = [step_data()], step_data()
    learner = MAMLTRPO(policy, inner_lrs=[0.7])
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]
    theta0 = flat_params(policy)

    def unflat(flat):
        return {
            nm: x.reshape(sh) for nm, sh, x in zip(names, shapes, torch.split(flat, [math.prod(s) for s in shapes]))
        }

    def logits(flat, obs):
        p = unflat(flat)
        return torch.tanh(obs @ p["layers.0.weight"].T + p["layers.0.bias"]) @ p["out.weight"].T + p["out.bias"]

    def adapt(theta, i):
        ep, adv = train[0].episodes, train[0].advantages
        logp = torch.log_softmax(logits(theta, ep.observations[i]), -1).gather(-1, ep.actions[i].unsqueeze(-1))[..., 0]
        loss = -(ep.mask[i] * logp * adv[i]).sum() / ep.mask[i].sum()
        return theta - 0.7 * torch.autograd.grad(loss, theta, create_graph=True)[0]

    def mean_kl(theta):
        ep = valid.episodes
        total = 0.0
        for i in range(n):
            old = logits(adapt(theta0.clone().requires_grad_(True), i), ep.observations[i]).detach()
            new = logits(adapt(theta, i), ep.observations[i])
            total = total + (ep.mask[i] * categorical_kl(old, new)).sum() / ep.mask[i].sum()
        return total / n

    hessian = torch.autograd.functional.hessian(mean_kl, theta0.clone())
    fvp = learner.fisher_vector_product(unflat(theta0), train, valid)
    for _ in range(3):
        v = torch.randn(theta0.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hessian @ v + DAMPING * v, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- 7. subsampled FVP, 2 inner steps


def test_two_step_subsampled_fisher_vector_product_matches_its_definition():
    """``fvp_subsample = 0.5`` with two inner steps: ``J^T M J`` with ``J = dout/dphi * S_1 * S_0``, where
    ``S_s`` is the Jacobian of inner step ``s`` run on the first half of each task's step-``s``
    episodes, taken at the full batch's parameters before that step, and ``dout/dphi`` and ``M``
    at the full batch's adapted parameters on the first half of the validation episodes."""
    policy, learner, train, valid = make_batch(lrs=(0.5, 0.3), e=4, fvp_subsample=0.5)
    ref = Reference(policy, learner.inner_lrs)
    theta0 = flat_params(policy)
    half = 2  # ceil(0.5 * 4)
    ep = valid.episodes
    fisher = torch.zeros(theta0.numel(), theta0.numel(), dtype=theta0.dtype)
    other = torch.zeros_like(fisher)  # the same with S_1 taken at the subsampled inner loop's point
    for i in range(ep.num_tasks):
        points, point = [], theta0.clone()
        for data, lr in zip(train, ref.lrs):  # the full batch's inner loop
            points.append(point)
            point = ref.inner_step(point.requires_grad_(True), data, i, lr, create_graph=False).detach()
        phi = point
        steps = [ref.step_jacobian(x, data, i, lr, half) for data, lr, x in zip(train, ref.lrs, points)]
        sub_point = ref.inner_step(theta0.clone().requires_grad_(True), train[0], i, ref.lrs[0], episodes=half)
        s1_sub = ref.step_jacobian(sub_point.detach(), train[1], i, ref.lrs[1], half)
        obs, mask = ep.observations[i, :, :half], ep.mask[i, :, :half]
        out = ref.output_jacobian(phi, obs)
        _, log_std = ref.outputs(phi, obs)
        w = (mask / mask.sum() / ep.num_tasks).unsqueeze(-1)
        m = torch.cat([(w * torch.exp(-2 * log_std)).reshape(-1), (2 * w).expand_as(log_std).reshape(-1)])
        j = out @ steps[1] @ steps[0]
        fisher += j.T @ (m[:, None] * j)
        j_other = out @ s1_sub @ steps[0]
        other += j_other.T @ (m[:, None] * j_other)
    fvp = learner.fisher_vector_product(ref.unflat(theta0), train, valid)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = torch.randn(theta0.shape, generator=gen, dtype=theta0.dtype)
        expected = fisher @ v + DAMPING * v
        torch.testing.assert_close(fvp(v), expected, rtol=1e-8, atol=1e-12)
        # the construction tells apart the two points at which inner step 1's Jacobian could be taken
        assert (other @ v + DAMPING * v - expected).norm() > 1e-6 * expected.norm()
