"""PEARL (Rakelly et al., 2019): off-policy meta-RL with a probabilistic context encoder and SAC.

A task is summarised by a latent ``z``. The encoder reads a *context* ``c`` of ``C`` transitions
``c_i = (s, a, r[, s'])`` of one task and infers the posterior as a product of Gaussian factors,
one per transition, which does not depend on the order of the context::

    (mu_i, var_i) = encoder(c_i)                      var_i = softplus(.), clamped at 1e-7
    var  = 1 / sum_i 1 / var_i                        the product of N(mu_i, var_i)
    mu   = var * sum_i mu_i / var_i
    q(z | c) = N(mu, diag(var))                       prior p(z) = N(0, I)

SAC (the paper's version: twin Q, a state value V with a soft-updated target, a fixed entropy
weight expressed as a reward scale) learns on transitions ``(s, a, r, s', d)`` of the same tasks
with ``z ~ q(z | c)`` appended to every state. Per gradient step, for ``T`` tasks with ``C``
context and ``B`` RL transitions each::

    z            ~ q(z | c)        (reparameterised: the critic's loss trains the encoder)
    Q target     = reward_scale * r + (1 - d) * gamma * V_target(s', z)
    L_Q          = mean (Q1(s, a, z) - Q target)^2 + mean (Q2(s, a, z) - Q target)^2
    L_KL         = kl_lambda * sum over tasks and latent dims of KL(q(z | c) || N(0, I))
    a~, log pi   = tanh-Gaussian policy at (s, z.detach()), reparameterised
    V target     = min(Q1, Q2)(s, a~, z.detach()) - log pi
    L_V          = mean (V(s, z.detach()) - V target)^2
    L_pi         = mean (log pi - min(Q1, Q2)(s, a~, z.detach()))
                   + mean_reg * mean(mu_pi^2) + std_reg * mean(log sigma_pi^2)
    encoder and Q: one Adam step on L_Q + L_KL;  V: on L_V;  pi: on L_pi
    V_target <- (1 - tau) V_target + tau V

Defaults as the paper's code (rlkit/oyster) for the MuJoCo tasks: latent 5, networks of 300 x 3,
encoder 200 x 3, Adam 3e-4, gamma 0.99, tau 0.005, reward scale 5, kl_lambda 0.1, batch 256.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Smallest variance of an encoder factor (the paper's code clamps at 1e-7 before the product).
MIN_FACTOR_VAR = 1e-7


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# The context encoder q(z | c)
# ---------------------------------------------------------------------------------------------
def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised product of Gaussian factors ``N(mu_i, var_i)`` along dim -2.

    ``mu, var [..., C, L] -> (mu, var) [..., L]``: precision-weighted mean and summed precision.
    """
    var = var.clamp(min=MIN_FACTOR_VAR)
    post_var = 1.0 / (1.0 / var).sum(-2)
    return post_var * (mu / var).sum(-2), post_var


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag var) || N(0, I))`` per latent dimension: ``0.5 (var + mu^2 - 1 - log var)``."""
    return 0.5 * (var + mu.pow(2) - 1.0 - var.log())


class ContextEncoder(nn.Module):
    """``q(z | c)``: an MLP maps each context transition to a Gaussian factor over ``z``.

    Args:
        context_dim: size of one transition ``(s, a, r)`` or ``(s, a, r, s')``.
        latent_dim: ``L``, the size of ``z``.
        hidden: the MLP's hidden layers.
    """

    def __init__(self, context_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200, 200)) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp([context_dim, *hidden, 2 * latent_dim])

    def factors(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [T, C, context_dim] -> (mu, var)`` of each transition's factor, ``[T, C, L]``."""
        out = self.net(context)
        return out[..., : self.latent_dim], F.softplus(out[..., self.latent_dim :])

    def posterior(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, var) [T, L]`` of ``q(z | c)`` for each task's context ``[T, C, context_dim]``.

        A task with no context yet (``C = 0``) gets the prior ``N(0, I)``.
        """
        if context.shape[-2] == 0:
            shape = (*context.shape[:-2], self.latent_dim)
            return context.new_zeros(shape), context.new_ones(shape)
        return product_of_gaussians(*self.factors(context))


def context_of(observations, actions, rewards, next_observations=None) -> torch.Tensor:
    """Transitions as context rows ``[..., obs + act + 1 (+ obs)]``: ``(s, a, r)`` or ``(s, a, r, s')``."""
    parts = [observations, actions, rewards.unsqueeze(-1)]
    if next_observations is not None:
        parts.append(next_observations)
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------
# SAC's networks, conditioned on z
# ---------------------------------------------------------------------------------------------
def actor_params_for_tasks(
    actor_params: dict[str, torch.Tensor], z: torch.Tensor, obs_dim: int
) -> dict[str, torch.Tensor]:
    """Per-task parameters of the actor over observations alone, ``z [N, L]`` folded in.

    The actor's first layer reads ``[s, z]``: ``W [s, z] + b = W_s s + (b + W_z z)``. Its weight
    becomes ``W_s`` (shared) and its bias ``b + W_z z_n`` per task, so a
    :class:`~agents.policies.TanhGaussianMLPPolicy` over ``obs_dim`` with these ``[N, ...]``
    parameters is the actor at each task's ``z``, and the lab's samplers (in-process and Ray
    workers) run it with ``per_task=True`` like any adapted policy.
    """
    n = z.shape[0]
    out = {name: p.detach().unsqueeze(0).expand(n, *p.shape) for name, p in actor_params.items()}
    weight, bias = actor_params["layers.0.weight"].detach(), actor_params["layers.0.bias"].detach()
    out["layers.0.weight"] = weight[:, :obs_dim].unsqueeze(0).expand(n, -1, -1)
    out["layers.0.bias"] = bias + z.detach() @ weight[:, obs_dim:].T
    return out


def tanh_gaussian_sample(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised action ``tanh(mean + exp(log_std) noise)`` and its log-density ``[...]``.

    ``log pi(a) = sum_j [log N(u_j; mean_j, std_j) - log(1 - tanh(u_j)^2)]``, the second term in
    the overflow-free form ``2 (log 2 - u - softplus(-2 u))``.
    """
    u = mean + log_std.exp() * noise
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return torch.tanh(u), (gaussian - log_det).sum(-1)


class Critic(nn.Module):
    """``Q(s, a, z)`` (or ``V(s, z)`` with ``act_dim = 0``): a ReLU MLP with one output."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (300, 300, 300)) -> None:
        super().__init__()
        self.net = mlp([in_dim, *hidden, 1])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, dim=-1)).squeeze(-1)


def sac_losses(
    *,
    q1,
    q2,
    v,
    v_target,
    actor,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminals: torch.Tensor,
    z: torch.Tensor,
    noise: torch.Tensor,
    reward_scale: float,
    gamma: float,
    mean_reg: float,
    std_reg: float,
) -> dict[str, torch.Tensor]:
    """PEARL's SAC losses for a batch of ``T`` tasks x ``B`` transitions (see the module docstring).

    ``obs, next_obs [T, B, obs_dim]``, ``actions [T, B, act_dim]``, ``rewards, terminals [T, B]``,
    ``z [T, L]`` (with its graph back to the encoder), ``noise [T, B, act_dim]`` (standard normal,
    the policy's reparameterisation). ``q1, q2, v, v_target`` are callables as :class:`Critic`;
    ``actor(s_z) -> (mu, log_sigma)`` as :meth:`agents.policies.TanhGaussianMLPPolicy.outputs`.
    Returns ``q``, ``v``, ``policy`` (each a scalar) and, for the log, ``log_pi`` and ``q_target``
    means.
    """
    t, b = rewards.shape
    z_b = z.unsqueeze(1).expand(t, b, z.shape[-1])
    z_d = z_b.detach()
    with torch.no_grad():
        q_target = reward_scale * rewards + (1.0 - terminals) * gamma * v_target(next_obs, z_d)
    q_loss = (q1(obs, actions, z_b) - q_target).pow(2).mean() + (q2(obs, actions, z_b) - q_target).pow(2).mean()

    mean, log_std = actor(torch.cat([obs, z_d], dim=-1))
    new_actions, log_pi = tanh_gaussian_sample(mean, log_std, noise)
    min_q = torch.min(q1(obs, new_actions, z_d), q2(obs, new_actions, z_d))
    v_loss = (v(obs, z_d) - (min_q - log_pi).detach()).pow(2).mean()
    policy_loss = (log_pi - min_q).mean() + mean_reg * mean.pow(2).mean() + std_reg * log_std.pow(2).mean()
    return {
        "q": q_loss,
        "v": v_loss,
        "policy": policy_loss,
        "log_pi": log_pi.detach().mean(),
        "q_target": q_target.mean(),
    }
