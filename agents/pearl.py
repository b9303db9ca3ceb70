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

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from agents.policies import TanhGaussianMLPPolicy
from metarl.core.learner import Learner, register
from metarl.rl.replay import ReplayBatch, Transitions

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


# ---------------------------------------------------------------------------------------------
# The agent and the learner
# ---------------------------------------------------------------------------------------------
class PEARLAgent(nn.Module):
    """Every network of PEARL: the encoder, the actor over ``[s, z]``, twin Q, V and V's target.

    Args:
        obs_dim, act_dim: the env's sizes.
        latent_dim: ``L``.
        hidden: hidden layers of the actor and the critics.
        encoder_hidden: hidden layers of the encoder.
        next_obs_in_context: context transitions ``(s, a, r, s')`` instead of ``(s, a, r)``.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        latent_dim: int = 5,
        hidden: Sequence[int] = (300, 300, 300),
        encoder_hidden: Sequence[int] = (200, 200, 200),
        next_obs_in_context: bool = False,
    ) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.latent_dim = obs_dim, act_dim, latent_dim
        self.next_obs_in_context = next_obs_in_context
        context_dim = obs_dim + act_dim + 1 + (obs_dim if next_obs_in_context else 0)
        self.encoder = ContextEncoder(context_dim, latent_dim, encoder_hidden)
        self.actor = TanhGaussianMLPPolicy(obs_dim + latent_dim, act_dim, hidden=hidden)
        self.q1 = Critic(obs_dim + act_dim + latent_dim, hidden)
        self.q2 = Critic(obs_dim + act_dim + latent_dim, hidden)
        self.v = Critic(obs_dim + latent_dim, hidden)
        self.v_target = copy.deepcopy(self.v).requires_grad_(False)

    def context(self, transitions: Transitions) -> torch.Tensor:
        """Context rows ``[T, C, context_dim]`` of drawn transitions."""
        t = transitions
        return context_of(
            t.observations, t.actions, t.rewards, t.next_observations if self.next_obs_in_context else None
        )

    def posterior(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.posterior(context)


class PEARL(Learner):
    """PEARL's meta-training: ``gradient_steps`` SAC + encoder updates per iteration from the buffers.

    Each gradient step draws ``meta_batch_size`` training tasks (without replacement), a context of
    ``context_size`` transitions from each task's context buffer and ``batch_size`` transitions from
    its RL buffer, then takes the updates of the module docstring: the losses are computed from
    the same networks, then the encoder and Q networks, V and the actor each take one Adam step,
    and V's target moves by ``tau``.
    """

    uses_query = True

    def __init__(
        self,
        agent: PEARLAgent,
        *,
        lr: float = 3e-4,
        gamma: float = 0.99,
        reward_scale: float = 5.0,
        kl_lambda: float = 0.1,
        tau: float = 0.005,
        mean_reg: float = 1e-3,
        std_reg: float = 1e-3,
        gradient_steps: int = 2000,
        meta_batch_size: int = 16,
        batch_size: int = 256,
        context_size: int = 100,
    ) -> None:
        self.model = agent
        self.objective = None
        self.inner_lrs = []
        self.gamma, self.reward_scale, self.kl_lambda, self.tau = gamma, reward_scale, kl_lambda, tau
        self.mean_reg, self.std_reg = mean_reg, std_reg
        self.gradient_steps, self.meta_batch_size = gradient_steps, meta_batch_size
        self.batch_size, self.context_size = batch_size, context_size
        self.groups = {
            "q": [*agent.encoder.parameters(), *agent.q1.parameters(), *agent.q2.parameters()],
            "v": list(agent.v.parameters()),
            "policy": list(agent.actor.parameters()),
        }
        self.optimizers = {name: torch.optim.Adam(params, lr=lr) for name, params in self.groups.items()}

    def step(self, batch: ReplayBatch, iteration: int) -> dict[str, float]:
        if batch.rl.num_tasks < self.meta_batch_size:
            raise ValueError(
                f"meta_batch_size ({self.meta_batch_size}) is more than the {batch.rl.num_tasks} training tasks"
            )
        sums: dict[str, float] = {}
        for _ in range(self.gradient_steps):
            tasks = batch.rng.choice(batch.rl.num_tasks, self.meta_batch_size, replace=False)
            context = batch.context.sample(tasks, self.context_size, batch.rng)
            transitions = batch.rl.sample(tasks, self.batch_size, batch.rng)
            for name, value in self.update(context, transitions, batch.generator).items():
                sums[name] = sums.get(name, 0.0) + value
        return {f"loss/{k}" if k in ("q", "v", "policy", "kl") else k: v / self.gradient_steps for k, v in sums.items()}

    def update(self, context: Transitions, transitions: Transitions, generator: torch.Generator) -> dict[str, float]:
        """One gradient step on ``T`` tasks' context ``[T, C, ...]`` and transitions ``[T, B, ...]``."""
        agent = self.model
        device = next(agent.parameters()).device
        context = Transitions(*(x.to(device) for x in context))
        transitions = Transitions(*(x.to(device) for x in transitions))
        t, b = transitions.rewards.shape
        mu, var = agent.posterior(agent.context(context))
        z_noise = torch.randn(mu.shape, generator=generator).to(device)
        z = mu + var.sqrt() * z_noise
        kl = self.kl_lambda * kl_to_standard_normal(mu, var).sum()
        action_noise = torch.randn((t, b, agent.act_dim), generator=generator).to(device)
        losses = sac_losses(
            q1=agent.q1,
            q2=agent.q2,
            v=agent.v,
            v_target=agent.v_target,
            actor=agent.actor.outputs,
            obs=transitions.observations,
            actions=transitions.actions,
            rewards=transitions.rewards,
            next_obs=transitions.next_observations,
            terminals=transitions.terminals,
            z=z,
            noise=action_noise,
            reward_scale=self.reward_scale,
            gamma=self.gamma,
            mean_reg=self.mean_reg,
            std_reg=self.std_reg,
        )
        objectives = {"q": losses["q"] + kl, "v": losses["v"], "policy": losses["policy"]}
        grads = {
            name: torch.autograd.grad(objectives[name], self.groups[name], retain_graph=name != "policy")
            for name in ("q", "v", "policy")
        }
        for name, group in self.groups.items():
            for p, g in zip(group, grads[name]):
                p.grad = g
            self.optimizers[name].step()
        with torch.no_grad():
            for target, source in zip(agent.v_target.parameters(), agent.v.parameters()):
                target.lerp_(source, self.tau)
        logged = {**losses, "kl": kl, "z_var": var.mean()}
        return {
            name: float(logged[name].detach()) for name in ("q", "v", "policy", "kl", "log_pi", "q_target", "z_var")
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            if name in state:
                opt.load_state_dict(state[name])


@register("pearl", family="rl")
def build(cfg, model: PEARLAgent, objective) -> PEARL:
    p = cfg.pearl
    return PEARL(
        model,
        lr=p.lr,
        gamma=cfg.gamma,
        reward_scale=p.reward_scale,
        kl_lambda=p.kl_lambda,
        tau=p.tau,
        mean_reg=p.policy_mean_reg,
        std_reg=p.policy_std_reg,
        gradient_steps=p.gradient_steps,
        meta_batch_size=cfg.meta_batch_size,
        batch_size=p.batch_size,
        context_size=p.context_size,
    )
