"""Policies called with an explicit parameter dict, returning a ``torch.distributions`` object.

- :class:`GaussianMLPPolicy`: continuous actions; an MLP gives the mean, a state-independent
  ``log_std`` vector gives the standard deviation (``Independent(Normal)``, so ``log_prob``
  sums over action dimensions).
- :class:`CategoricalMLPPolicy`: discrete actions; the MLP gives the logits.
- :class:`TanhGaussianMLPPolicy`: SAC's squashed Gaussian, ``a = tanh(u)``, ``u ~ N(mu(s),
  sigma(s))``, the MLP giving both ``mu`` and ``log sigma`` (PEARL's actor).

``policy(obs, params)`` uses ``params`` (a dict like ``dict(policy.named_parameters())``, e.g.
an inner-loop adapted dict) instead of the module's own parameters; ``params=None`` uses the
module's. Parameters may carry a leading task dimension ``[N, ...]`` together with observations
``[N, ..., obs_dim]``: each task's observations then go through that task's parameters (one
batched matmul per layer), which is how the sampler runs per-task adapted policies in one call.

``outputs(obs, params)`` gives the distribution's parameters as a tuple of tensors and
``distribution(outputs)`` builds it; ``kl_hessian_product`` is the Hessian of the KL divergence
in those outputs (the Fisher information), which the TRPO meta-update uses for exact
Gauss-Newton Fisher-vector products.

The sampler draws all randomness up front (``noise(shape, generator)``) and turns it into
actions with ``actions_from_noise(dist, noise)``, so an episode depends only on its task's
seed, never on how tasks are grouped into batches or workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

#: ``torch.tanh``, not ``2 sigmoid(2x) - 1``: the sigmoid form is faster in a plain forward pass
#: (258 vs 421 us for [800, 64] on one core), but differentiating it twice, as the second-order
#: meta-update does, takes 1.7x as long (673 vs 398 ms for [40, 4000, 64]; measured 2026-11-30).
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class _MLPPolicy(nn.Module):
    """Shared MLP trunk: ``layers.{i}`` hidden layers then ``out``."""

    discrete: bool

    def __init__(self, obs_dim: int, out_dim: int, *, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if obs_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer sizes must be >= 1, got obs_dim={obs_dim}, hidden={list(hidden)}, out={out_dim}")
        self.obs_dim = obs_dim
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        sizes = (obs_dim, *self.hidden)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], out_dim)
        for layer in (*self.layers, self.out):  # Xavier-uniform weights, zero biases (as the MAML-RL references)
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def _trunk(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        x = obs
        for i in range(len(self.layers)):
            x = act(_linear(x, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]))
        return _linear(x, params["out.weight"], params["out.bias"])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ W^T + b``; with task-batched ``W [N, out, in]`` and ``x [N, ..., in]``."""
    if weight.dim() == 2:
        return torch.nn.functional.linear(x, weight, bias)
    n = weight.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])
    y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


class GaussianMLPPolicy(_MLPPolicy):
    """Diagonal Gaussian policy, mean from an MLP, state-independent ``log_std`` (``[act_dim]``)."""

    discrete = False

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        init_std: float = 1.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__(obs_dim, act_dim, hidden=hidden, activation=activation)
        if not init_std > 0 or not min_std > 0:
            raise ValueError(f"init_std and min_std must be > 0, got {init_std} and {min_std}")
        self.act_dim = act_dim
        self.min_log_std = float(torch.log(torch.tensor(min_std)))
        self.log_std = nn.Parameter(torch.full((act_dim,), float(torch.log(torch.tensor(init_std)))))

    def outputs(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """Distribution parameters ``(mean, log_std)``, both ``[..., act_dim]``."""
        params = self.params() if params is None else params
        mean = self._trunk(obs, params)
        log_std = params["log_std"].clamp(min=self.min_log_std)
        if log_std.dim() == 2:  # task-batched [N, act_dim] -> broadcast over [N, ..., act_dim]
            log_std = log_std.reshape(log_std.shape[0], *([1] * (mean.dim() - 2)), log_std.shape[1])
        # full-size and contiguous: no element of the exp below takes a vector-loop tail
        return mean, log_std.expand_as(mean).contiguous()

    @staticmethod
    def distribution(outputs: tuple[torch.Tensor, ...]) -> Distribution:
        mean, log_std = outputs
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    @staticmethod
    def kl_hessian_product(
        old: tuple[torch.Tensor, ...], tangent: tuple[torch.Tensor, ...], weights: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Hessian of ``sum(weights * KL(old || new))`` in the outputs, at new = old, times ``tangent``.

        For diagonal Gaussians: 1 / sigma^2 for the mean and 2 for log-std, no cross terms.
        ``weights``: per sample (``mean.shape[:-1]``).
        """
        _, log_std = old
        w = weights.unsqueeze(-1)
        return w * tangent[0] * torch.exp(-2 * log_std), w * 2 * tangent[1]

    def forward(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> Distribution:
        return self.distribution(self.outputs(obs, params))

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Standard normal draws ``[*shape, act_dim]``."""
        return torch.randn(*shape, self.act_dim, generator=generator)

    @staticmethod
    def actions_from_noise(dist: Distribution, noise: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        return dist.mean if deterministic else dist.mean + dist.stddev * noise


class CategoricalMLPPolicy(_MLPPolicy):
    """Categorical policy over ``num_actions`` discrete actions, logits from an MLP."""

    discrete = True

    def __init__(
        self, obs_dim: int, num_actions: int, *, hidden: Sequence[int] = (64, 64), activation: str = "tanh"
    ) -> None:
        super().__init__(obs_dim, num_actions, hidden=hidden, activation=activation)
        self.num_actions = num_actions

    def outputs(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """Distribution parameters ``(logits,)``, ``[..., num_actions]``."""
        params = self.params() if params is None else params
        return (self._trunk(obs, params),)

    @staticmethod
    def distribution(outputs: tuple[torch.Tensor, ...]) -> Distribution:
        return Categorical(logits=outputs[0], validate_args=False)

    @staticmethod
    def kl_hessian_product(
        old: tuple[torch.Tensor, ...], tangent: tuple[torch.Tensor, ...], weights: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Hessian of ``sum(weights * KL(old || new))`` in the logits at new = old, times ``tangent``:
        ``diag(p) - p p^T`` per sample."""
        p = torch.softmax(old[0], dim=-1)
        t = tangent[0]
        return (weights.unsqueeze(-1) * (p * t - p * (p * t).sum(-1, keepdim=True)),)

    def forward(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> Distribution:
        return self.distribution(self.outputs(obs, params))

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Uniform draws in [0, 1) ``[*shape]`` (inverse-CDF sampling)."""
        return torch.rand(*shape, generator=generator)

    @staticmethod
    def actions_from_noise(dist: Distribution, noise: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        if deterministic:
            return dist.probs.argmax(-1)
        cdf = dist.probs.cumsum(-1)
        index = torch.searchsorted(cdf, noise.unsqueeze(-1).to(cdf.dtype)).squeeze(-1)
        return index.clamp(max=cdf.shape[-1] - 1)


#: The tanh-Gaussian policy's log standard deviation is clamped to this range (SAC's bounds).
LOG_STD_RANGE = (-20.0, 2.0)


class TanhNormal:
    """``tanh(u)``, ``u ~ N(loc, exp(log_std))`` per action dimension; ``log_prob`` sums over them."""

    def __init__(self, loc: torch.Tensor, log_std: torch.Tensor) -> None:
        self.loc, self.log_std = loc, log_std

    def from_noise(self, noise: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        return torch.tanh(self.loc if deterministic else self.loc + self.log_std.exp() * noise)

    @property
    def mean(self) -> torch.Tensor:
        """The deterministic action ``tanh(loc)`` (the mode of ``u`` squashed, as SAC acts in evaluation)."""
        return torch.tanh(self.loc)

    def sample(self) -> torch.Tensor:
        return self.from_noise(torch.randn_like(self.loc))

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """``log N(u) - log(1 - tanh(u)^2)`` summed over action dims, ``u = atanh(a)`` (``|a|`` below 1 - 1e-6)."""
        u = torch.atanh(actions.clamp(-1 + 1e-6, 1 - 1e-6))
        z = (u - self.loc) * torch.exp(-self.log_std)
        gaussian = -0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)
        return (gaussian - 2.0 * (math.log(2.0) - u - torch.nn.functional.softplus(-2.0 * u))).sum(-1)


class TanhGaussianMLPPolicy(_MLPPolicy):
    """SAC's policy: ``a = tanh(u)``, ``u ~ N(mu(s), sigma(s))``; the MLP's ``2 act_dim`` outputs
    are ``mu`` and ``log sigma`` (clamped to :data:`LOG_STD_RANGE`)."""

    discrete = False

    def __init__(
        self, obs_dim: int, act_dim: int, *, hidden: Sequence[int] = (300, 300, 300), activation: str = "relu"
    ) -> None:
        super().__init__(obs_dim, 2 * act_dim, hidden=hidden, activation=activation)
        self.act_dim = act_dim

    def outputs(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """``(mu, log_sigma)`` of the pre-tanh Gaussian, both ``[..., act_dim]``."""
        params = self.params() if params is None else params
        out = self._trunk(obs, params)
        return out[..., : self.act_dim].contiguous(), out[..., self.act_dim :].clamp(*LOG_STD_RANGE)

    @staticmethod
    def distribution(outputs: tuple[torch.Tensor, ...]) -> TanhNormal:
        return TanhNormal(*outputs)

    def forward(self, obs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> TanhNormal:
        return self.distribution(self.outputs(obs, params))

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Standard normal draws ``[*shape, act_dim]``."""
        return torch.randn(*shape, self.act_dim, generator=generator)

    @staticmethod
    def actions_from_noise(dist: TanhNormal, noise: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        return dist.from_noise(noise, deterministic=deterministic)


def make_policy(
    observation_space,
    action_space,
    *,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    init_std: float = 1.0,
    recurrent: str | None = None,
    rnn_size: int = 256,
):
    """The policy for a gymnasium ``Box`` (Gaussian) or ``Discrete`` (categorical) action space.

    ``recurrent`` ("gru" or "lstm"): RL^2's :class:`agents.recurrent_policy.RecurrentGaussianPolicy`
    (``Box`` actions) with a state of ``rnn_size``, instead of the MLP of ``hidden``.
    """
    import gymnasium as gym

    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(f"policies need a flat Box observation space, got {observation_space}")
    obs_dim = observation_space.shape[0]
    if recurrent is not None:
        from agents.recurrent_policy import RecurrentGaussianPolicy

        if not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1):
            raise ValueError(f"the recurrent policy supports Box(shape=(n,)) action spaces, got {action_space}")
        return RecurrentGaussianPolicy(
            obs_dim, action_space.shape[0], hidden_size=rnn_size, cell=recurrent, init_std=init_std
        )
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return GaussianMLPPolicy(
            obs_dim, action_space.shape[0], hidden=hidden, activation=activation, init_std=init_std
        )
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLPPolicy(obs_dim, int(action_space.n), hidden=hidden, activation=activation)
    raise ValueError(f"policies support Box(shape=(n,)) or Discrete action spaces, got {action_space}")
