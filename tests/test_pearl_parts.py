"""PEARL's parts against hand computations: the product of Gaussians, the encoder's invariance, the KL,
the tanh-Gaussian log-density and SAC's losses on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch

from agents.pearl import (
    ContextEncoder,
    actor_params_for_tasks,
    kl_to_standard_normal,
    product_of_gaussians,
    sac_losses,
    tanh_gaussian_sample,
)
from agents.policies import TanhGaussianMLPPolicy

LOG_N0 = -0.5 * math.log(2 * math.pi)  # log N(0; 0, 1)


def test_product_of_gaussians_by_hand():
    # N(1, 1) x N(3, 1) = N(2, 1/2);  N(0, 2) x N(4, 1/2): precision 1/2 + 2 = 5/2, mean (0 + 8) / (5/2) = 3.2
    mu = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])  # [T=1, C=2, L=2]
    var = torch.tensor([[[1.0, 2.0], [1.0, 0.5]]])
    post_mu, post_var = product_of_gaussians(mu, var)
    torch.testing.assert_close(post_mu, torch.tensor([[2.0, 3.2]]))
    torch.testing.assert_close(post_var, torch.tensor([[0.5, 0.4]]))
    # one factor is itself; a factor of tiny variance dominates (clamped at 1e-7, not divided by 0)
    one_mu, one_var = product_of_gaussians(mu[:, :1], var[:, :1])
    torch.testing.assert_close(one_mu, mu[:, 0])
    torch.testing.assert_close(one_var, var[:, 0])
    sharp_mu, sharp_var = product_of_gaussians(torch.tensor([[[5.0], [-1.0]]]), torch.tensor([[[0.0], [1.0]]]))
    torch.testing.assert_close(sharp_var, torch.tensor([[1.0 / (1e7 + 1.0)]]))
    torch.testing.assert_close(sharp_mu, torch.tensor([[(5e7 - 1.0) / (1e7 + 1.0)]]))


def test_encoder_posterior_ignores_the_order_of_the_context():
    torch.manual_seed(0)
    encoder = ContextEncoder(context_dim=6, latent_dim=3, hidden=(16, 16))
    context = torch.randn(4, 10, 6)  # 4 tasks, 10 transitions each
    mu, var = encoder.posterior(context)
    assert mu.shape == var.shape == (4, 3) and bool((var > 0).all())
    perm = torch.randperm(10)
    mu_p, var_p = encoder.posterior(context[:, perm])
    torch.testing.assert_close(mu_p, mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var_p, var, rtol=1e-6, atol=1e-6)
    # each task's posterior is its own context's: changing task 1's context leaves task 0's alone
    other = context.clone()
    other[1] += 1.0
    mu_o, _ = encoder.posterior(other)
    torch.testing.assert_close(mu_o[0], mu[0])
    assert not torch.allclose(mu_o[1], mu[1])
    # more context sharpens the posterior: every factor adds precision
    _, var_half = encoder.posterior(context[:, :5])
    assert bool((var < var_half).all())
    # no context yet: the prior
    mu_0, var_0 = encoder.posterior(context[:, :0])
    torch.testing.assert_close(mu_0, torch.zeros(4, 3))
    torch.testing.assert_close(var_0, torch.ones(4, 3))


def test_kl_to_the_prior_by_hand():
    kl = kl_to_standard_normal(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, math.e, 1.0]))
    torch.testing.assert_close(kl, torch.tensor([0.5, 0.5 * (math.e - 2.0), 0.0]))
    # against torch.distributions for random values
    mu, var = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, var.sqrt()), torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    )
    torch.testing.assert_close(kl_to_standard_normal(mu, var), reference)


def test_tanh_gaussian_log_density():
    mean = torch.tensor([[0.3, -1.0], [2.0, 0.0]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 0.2], [0.0, -1.0]], dtype=torch.float64)
    noise = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=torch.float64)
    action, log_pi = tanh_gaussian_sample(mean, log_std, noise)
    u = mean + log_std.exp() * noise
    expected = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(action, torch.tanh(u))
    torch.testing.assert_close(log_pi, expected)
    # far in the tail the correction stays finite (where 1 - tanh(u)^2 rounds to 0 in float32)
    _, far = tanh_gaussian_sample(torch.tensor([[30.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(far).all()


def test_actor_heads_shapes_and_log_std_bounds():
    actor = TanhGaussianMLPPolicy(obs_dim=5, act_dim=4, hidden=(8, 8))
    mean, log_std = actor.outputs(torch.randn(5, 7, 5) * 1e4)
    assert mean.shape == log_std.shape == (5, 7, 4)
    log_std = log_std.detach()
    assert float(log_std.min()) >= -20.0 and float(log_std.max()) <= 2.0


def test_the_samplers_actor_is_the_actor_at_each_tasks_z():
    """z folded into the first layer's bias: the obs-only policy with per-task parameters acts as the
    actor over [s, z], and its log-density of an action is SAC's."""
    torch.manual_seed(1)
    obs_dim, latent, act_dim = 4, 3, 2
    actor = TanhGaussianMLPPolicy(obs_dim + latent, act_dim, hidden=(16, 16))
    for p in actor.parameters():  # nonzero biases, so a dropped bias would show
        torch.nn.init.normal_(p, std=0.3)
    structure = TanhGaussianMLPPolicy(obs_dim, act_dim, hidden=(16, 16))
    z = torch.randn(5, latent)
    obs = torch.randn(5, 8, obs_dim)  # 5 tasks, 8 states each
    per_task = actor_params_for_tasks(actor.params(), z, obs_dim)
    mean, log_std = structure.outputs(obs, per_task)
    ref_mean, ref_log_std = actor.outputs(torch.cat([obs, z[:, None].expand(5, 8, latent)], -1))
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_std, ref_log_std, rtol=1e-5, atol=1e-6)
    noise = torch.randn(5, 8, act_dim)
    dist = structure.distribution((mean, log_std))
    actions = structure.actions_from_noise(dist, noise)
    expected_actions, expected_log_pi = tanh_gaussian_sample(mean, log_std, noise)
    torch.testing.assert_close(actions, expected_actions)
    torch.testing.assert_close(dist.log_prob(actions), expected_log_pi, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(structure.actions_from_noise(dist, noise, deterministic=True), torch.tanh(mean))


def _tiny_batch():
    """T = 1 task, B = 2 transitions, 1-D observations, actions and latent."""
    return dict(
        obs=torch.tensor([[[1.0], [2.0]]]),
        actions=torch.tensor([[[0.5], [-0.5]]]),
        rewards=torch.tensor([[1.0, 2.0]]),
        next_obs=torch.tensor([[[3.0], [4.0]]]),
        terminals=torch.tensor([[0.0, 1.0]]),
        noise=torch.zeros(1, 2, 1),
    )


def _networks(mean=0.0, log_std=0.0):
    """Linear stand-ins whose values are easy by hand."""
    return dict(
        q1=lambda o, a, z: o.sum(-1) + a.sum(-1) + z.sum(-1),
        q2=lambda o, a, z: 2 * (o.sum(-1) + a.sum(-1) + z.sum(-1)),
        v=lambda o, z: 0.5 * o.sum(-1),
        v_target=lambda o, z: o.sum(-1) + 1.0,
        actor=lambda oz: (torch.full((*oz.shape[:-1], 1), mean), torch.full((*oz.shape[:-1], 1), log_std)),
    )


def test_sac_losses_by_hand():
    z = torch.tensor([[0.1]], requires_grad=True)
    losses = sac_losses(**_networks(), **_tiny_batch(), z=z, reward_scale=5.0, gamma=0.9, mean_reg=0.0, std_reg=0.0)
    # Q target: 5 r + (1 - d) 0.9 V_target(s') = [5 + 0.9 * 4, 10 + 0] = [8.6, 10]
    # Q1(s, a, z) = s + a + z = [1.6, 1.6];  Q2 = 2 Q1 = [3.2, 3.2]
    q_loss = ((1.6 - 8.6) ** 2 + (1.6 - 10) ** 2) / 2 + ((3.2 - 8.6) ** 2 + (3.2 - 10) ** 2) / 2
    torch.testing.assert_close(losses["q"], torch.tensor(q_loss))
    torch.testing.assert_close(losses["q_target"], torch.tensor(9.3))
    # new action tanh(0) = 0, log pi = log N(0; 0, 1) - log(1 - 0) = LOG_N0
    # min Q(s, 0, z) = min([1.1, 2.1], [2.2, 4.2]) = [1.1, 2.1];  V target = min Q - log pi
    v_loss = ((0.5 - (1.1 - LOG_N0)) ** 2 + (1.0 - (2.1 - LOG_N0)) ** 2) / 2
    torch.testing.assert_close(losses["v"], torch.tensor(v_loss))
    torch.testing.assert_close(losses["policy"], torch.tensor(LOG_N0 - 1.6))
    torch.testing.assert_close(losses["log_pi"], torch.tensor(LOG_N0))
    # z learns only from the critic: dL_Q/dz = mean 2 (Q1 - y) + mean 4 (Q2 - y) = 2 (-7.7) + 4 (-6.1)
    (grad_q,) = torch.autograd.grad(losses["q"], z, retain_graph=True)
    torch.testing.assert_close(grad_q, torch.tensor([[2 * -7.7 + 4 * -6.1]]))
    # (z is the only tensor here that asks for a gradient: no path to it from V's or the policy's loss)
    assert not losses["v"].requires_grad and not losses["policy"].requires_grad


def test_sac_policy_regularisers_and_reparameterisation():
    z = torch.tensor([[0.1]])
    base = dict(**_tiny_batch(), z=z, reward_scale=5.0, gamma=0.9)
    plain = sac_losses(**_networks(0.3, -0.5), **base, mean_reg=0.0, std_reg=0.0)
    regular = sac_losses(**_networks(0.3, -0.5), **base, mean_reg=1.0, std_reg=2.0)
    torch.testing.assert_close(regular["policy"] - plain["policy"], torch.tensor(0.3**2 + 2 * 0.5**2))
    # the policy's gradient reaches its mean through the reparameterised action and log pi
    mean = torch.tensor(0.3, requires_grad=True)
    nets = _networks()
    nets["actor"] = lambda oz: (mean.expand((*oz.shape[:-1], 1)), torch.zeros((*oz.shape[:-1], 1)))
    loss = sac_losses(**nets, **base, mean_reg=0.0, std_reg=0.0)["policy"]
    (grad,) = torch.autograd.grad(loss, mean)
    # u = 0.3, a = tanh(u); log pi = LOG_N0 - log(1 - tanh(u)^2) (noise 0); min Q = Q1 = s + a + z
    # d/du [log pi - a] = 2 tanh(u) - (1 - tanh(u)^2), the same for both transitions
    th = math.tanh(0.3)
    assert grad.item() == pytest.approx(2 * th - (1 - th**2), rel=1e-5)
