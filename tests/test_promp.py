"""ProMP: the LVC inner loss against its definition, and the meta-gradient against a reference
written from the paper's equations (independent of the learner's code)."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from torch.func import functional_call, hessian, jacrev

from agents.policies import GaussianMLPPolicy
from agents.promp import LVCObjective, ProMP
from metarl.rl.advantages import compute_advantages
from metarl.rl.objective import PolicyGradientObjective, RLBatch, StepData
from metarl.rl.sampling import VectorSampler, task_seeds
from metarl.rl.value_baselines import LinearFeatureBaseline

NAV = "metarl/Navigation2D-v0"


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params.values()])


def _batch(policy, n=2, episodes=3, horizon=6, seed=0, params=None, per_task=False):
    """Episodes of Navigation2D sampled with ``policy`` whose stored log-probs are recomputed by the
    policy itself (so the likelihood ratio at the sampling parameters is exactly 1)."""
    sampler = VectorSampler(NAV, episodes_per_task=episodes, horizon=horizon)
    env = gym.make(NAV)
    env.reset(seed=seed)
    tasks = env.unwrapped.sample_tasks(n)
    params = policy.params() if params is None else params
    eps = sampler.sample(policy, params, tasks, task_seeds(seed, 0, n=n), per_task=per_task)
    with torch.no_grad():
        p = params if per_task else {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}
        exact = policy(eps.observations, p).log_prob(eps.actions) * eps.mask
    eps = eps._replace(log_probs=exact)
    adv = compute_advantages(eps, LinearFeatureBaseline(), gamma=0.99, gae_lambda=1.0, normalize=True)
    return StepData(eps, adv, "steps"), tasks, sampler


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return GaussianMLPPolicy(2, 2, hidden=(4,), init_std=0.7)


def test_lvc_has_reinforces_value_and_gradient_at_the_sampling_parameters(policy):
    data, _, _ = _batch(policy)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in policy.params().items()}
    per_task = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in theta.items()}
    lvc = LVCObjective(policy).support_loss(per_task, data)
    reinforce = PolicyGradientObjective(policy).support_loss(per_task, data)
    # value: -sum_tasks mean(A) (the ratio is 1); gradient: REINFORCE's
    torch.testing.assert_close(lvc, -data.mean(data.advantages).sum(), rtol=1e-6, atol=1e-6)
    g_lvc = torch.autograd.grad(lvc, list(theta.values()))
    g_reinforce = torch.autograd.grad(reinforce, list(theta.values()))
    for a, b in zip(g_lvc, g_reinforce):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lvc_hessian_is_its_definition_not_reinforces(policy):
    # one task: H_LVC = -sum_t w_t A_t (g_t g_t^T + H_t), g_t and H_t the gradient and Hessian of
    # log pi(a_t | s_t), w_t the step's weight in the task mean; REINFORCE's lacks g_t g_t^T
    data, _, _ = _batch(policy, n=1, episodes=2, horizon=4)
    eps = data.episodes
    obs, act = eps.observations.reshape(-1, 2), eps.actions.reshape(-1, 2)
    weights = (data.step_weights() * data.advantages).reshape(-1)
    theta = {k: v.detach() for k, v in policy.params().items()}
    names, shapes = list(theta), [v.shape for v in theta.values()]
    sizes = [v.numel() for v in theta.values()]

    def log_prob(flat, o, a):
        params = {n: p.view(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(policy, params, (o,)).log_prob(a)

    flat = _flat(theta)
    expected = torch.zeros(flat.numel(), flat.numel())
    for o, a, w in zip(obs, act, weights):
        g = jacrev(log_prob)(flat, o, a)
        h = hessian(log_prob)(flat, o, a)
        expected -= w * (torch.outer(g, g) + h)

    def lvc(flat_theta):
        params = {n: p.view(1, *s) for n, p, s in zip(names, torch.split(flat_theta, sizes), shapes)}
        return LVCObjective(policy).support_loss(params, data)

    def reinforce(flat_theta):
        params = {n: p.view(1, *s) for n, p, s in zip(names, torch.split(flat_theta, sizes), shapes)}
        return PolicyGradientObjective(policy).support_loss(params, data)

    got = torch.autograd.functional.hessian(lvc, flat)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (torch.autograd.functional.hessian(reinforce, flat) - expected).abs().max() > 1e-3


def test_promp_meta_gradient_equals_a_reference_from_the_equations(policy):
    # at theta_old: the clip is inactive (ratio 1) and the KL penalty has zero gradient, so the
    # gradient of ProMP's loss is that of -mean_i mean_V_i[ pi_phi_i / pi_old * A ] with
    # phi_i = theta - lr * grad L^LVC_i(theta), written here with plain autograd
    lr = 0.3
    train, tasks, sampler = _batch(policy, n=2, episodes=3, horizon=6, seed=1)
    learner = ProMP(policy, inner_lrs=[lr], outer_lr=1e-3, steps=1, clip=0.2, kl_coef=0.5)
    theta0 = learner.theta()
    with torch.no_grad():
        adapted = learner.adapt(theta0, [train], first_order=True)
    valid, _, _ = _batch(policy, n=2, episodes=3, horizon=6, seed=1, params=adapted, per_task=True)
    # the validation episodes must come from the adapted policies: resample with them, same tasks
    batch = RLBatch([train], valid, adapted)

    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    surrogate = 0.0
    for i in range(2):
        eps_i = train.episodes.task(i)

        def inner_loss(params, eps_i=eps_i, i=i):
            logp = functional_call(policy, params, (eps_i.observations,)).log_prob(eps_i.actions)
            ratio = torch.exp(logp - eps_i.log_probs)
            return -((ratio * train.advantages[i : i + 1]) * eps_i.mask).sum() / eps_i.mask.sum()

        grads = torch.autograd.grad(inner_loss(theta), list(theta.values()), create_graph=True)
        phi = {k: v - lr * g for (k, v), g in zip(theta.items(), grads)}
        v_i = valid.episodes.task(i)
        logp = functional_call(policy, phi, (v_i.observations,)).log_prob(v_i.actions)
        ratio = torch.exp(logp - v_i.log_probs)
        surrogate = surrogate - ((ratio * valid.advantages[i : i + 1]) * v_i.mask).sum() / v_i.mask.sum() / 2
    expected = torch.autograd.grad(surrogate, list(theta.values()))

    expanded = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in theta0.items()}
    old = [tuple(o.detach() for o in policy.outputs(train.episodes.observations, expanded))]
    params = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    losses = learner.losses(params, batch, old)
    assert float(losses["inner_kl"].detach()) == pytest.approx(0.0, abs=1e-10)
    got = torch.autograd.grad(losses["loss"], list(params.values()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_promp_step_improves_its_objective_and_moves_the_pre_update_policy(policy):
    train, _, _ = _batch(policy, n=2, episodes=4, horizon=8, seed=2)
    learner = ProMP(policy, inner_lrs=[0.1], outer_lr=1e-2, steps=4)
    theta0 = {k: v.clone() for k, v in learner.theta().items()}
    with torch.no_grad():
        adapted = learner.adapt(theta0, [train], first_order=True)
    valid, _, _ = _batch(policy, n=2, episodes=4, horizon=8, seed=2, params=adapted, per_task=True)
    metrics = learner.step(RLBatch([train], valid, adapted), 0)
    assert metrics["loss/surrogate_after"] < metrics["loss/surrogate_before"]
    assert metrics["inner_kl"] > 0  # the pre-update policy moved away from the one that sampled
    assert not torch.equal(_flat(theta0), _flat(learner.theta()))
