"""Convert metarl MLP policies to and from stable-baselines3 PPO models.

- :func:`to_sb3` builds a :class:`stable_baselines3.PPO` whose actor is a copy of a metarl
  policy (same hidden sizes and activation; for the Gaussian the same state-independent
  ``log_std``); SB3's value network keeps its fresh initialisation. Use it to fine-tune a
  meta-learned initialisation with PPO, or to hand a policy to SB3 tooling.
- :func:`from_sb3` does the reverse: it reads a PPO (or A2C) model's actor into a
  :class:`~agents.policies.GaussianMLPPolicy` or :class:`~agents.policies.CategoricalMLPPolicy`,
  e.g. to meta-train from a multi-task policy trained with SB3.

Parameter correspondence (``n`` hidden layers)::

    metarl                        stable-baselines3 (model.policy)
    layers.{i}.weight / .bias     mlp_extractor.policy_net[2 i].weight / .bias   (Linear; [2 i + 1] is the activation)
    out.weight / out.bias         action_net.weight / .bias                       (mean, or logits)
    log_std                       log_std                                         (Gaussian only)

Only what both sides can represent converts: a flat ``Box`` observation space, ``Box(shape=(n,))``
or ``Discrete`` actions, tanh or ReLU hidden layers, no layers shared between actor and critic
(SB3 2.x can share only a trainable features extractor), no gSDE and no squashed (tanh-bounded)
outputs. Anything else raises ``ValueError`` saying what is wrong and what is supported.

Two behaviours differ by design and are not checked: SB3's ``predict`` clips Box actions to the
action-space bounds (the metarl policy's mean is unclipped; metarl envs clip in ``step``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch
from torch import nn

from agents.policies import CategoricalMLPPolicy, GaussianMLPPolicy, TanhGaussianMLPPolicy
from metarl.core.atomic import atomic_open
from metarl.rl.actions import action_affine

if TYPE_CHECKING:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecEnv

Policy = GaussianMLPPolicy | CategoricalMLPPolicy

# metarl activation name <-> SB3 activation module class
_TO_SB3_ACTIVATION: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
_FROM_SB3_ACTIVATION: dict[type[nn.Module], str] = {cls: name for name, cls in _TO_SB3_ACTIVATION.items()}

# keys of ``ppo_kwargs`` that to_sb3 sets itself
_RESERVED_PPO_KWARGS = ("policy", "env", "policy_kwargs")


def to_sb3(
    policy: Policy,
    env: gym.Env | VecEnv | str,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    path: str | os.PathLike | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    vf_hidden: Sequence[int] | None = None,
    ppo_kwargs: Mapping[str, Any] | None = None,
    action_scale: float | None = None,
) -> PPO:
    """A :class:`stable_baselines3.PPO` model whose actor equals ``policy``.

    Args:
        policy: the metarl policy to copy.
        env: a gymnasium env, an SB3 ``VecEnv``, or a registered env id; an id is made with
            ``gymnasium.make(env, **env_kwargs)`` (``metarl/...`` ids are registered by importing
            ``envs``, which this does). Its observation space must be ``Box(shape=(obs_dim,))``
            and its action space must match the policy: ``Box(shape=(act_dim,))`` for a
            :class:`GaussianMLPPolicy`, ``Discrete(num_actions)`` for a :class:`CategoricalMLPPolicy`.
        params: parameters to copy instead of the policy's own, e.g. an inner-loop adapted dict
            (same names and shapes as ``policy.named_parameters()``; no task dimension).
        path: if given, the model is also saved there as an SB3 zip, atomically (a temp file in
            the same directory, renamed over ``path``). The file is written at exactly ``path``
            (SB3 adds no ``.zip`` suffix); ``PPO.load(path)`` reads it.
        env_kwargs: keyword arguments for ``gymnasium.make`` when ``env`` is an id.
        vf_hidden: hidden sizes of SB3's value network (default: the policy's ``hidden``). Its
            weights keep SB3's initialisation.
        ppo_kwargs: further keyword arguments for ``PPO(...)`` (``learning_rate``, ``n_steps``,
            ``seed``, ``device``...); ``device`` defaults to ``"cpu"`` (SB3's advice for MLP
            policies). ``policy``, ``env`` and ``policy_kwargs`` are set here and may not be given.
        action_scale: the run's ``action_scale`` (the policy acts in ``[-s, s]``, mapped onto the
            env's bounds: :mod:`metarl.rl.actions`). The map is folded into the copy, so SB3's
            actor acts in the env's own units: mean ``offset + slope * mean``, log-std
            ``log_std + log(slope)``. With SB3's clipping to the bounds, its actions are then
            distributed exactly as the metarl policy's mapped ones.

    Returns:
        The PPO model (not trained; ``model.learn`` fine-tunes it).
    """
    from stable_baselines3 import PPO

    if getattr(policy, "recurrent", False):
        raise ValueError(
            "a recurrent (RL^2) policy has no stable-baselines3 PPO equivalent: SB3's PPO takes MLP policies only; "
            "use the run with metarl adapt / metarl.load instead"
        )
    if isinstance(policy, TanhGaussianMLPPolicy):
        raise ValueError(
            "a PEARL actor (a tanh-squashed Gaussian with a state-dependent std, conditioned on z) has no "
            "stable-baselines3 PPO equivalent; use the run with metarl adapt / metarl.load instead"
        )
    if not isinstance(policy, (GaussianMLPPolicy, CategoricalMLPPolicy)):
        raise ValueError(f"policy must be a GaussianMLPPolicy or CategoricalMLPPolicy, got {type(policy).__name__}")
    ppo_kwargs = dict(ppo_kwargs or {})
    reserved = sorted(set(ppo_kwargs) & set(_RESERVED_PPO_KWARGS))
    if reserved:
        raise ValueError(
            f"ppo_kwargs may not set {reserved}: to_sb3 derives {list(_RESERVED_PPO_KWARGS)} from the policy and env"
        )
    if env_kwargs and not isinstance(env, str):
        raise ValueError(f"env_kwargs is only used with an env id, but env is a {type(env).__name__}")
    if isinstance(env, str):
        import envs  # noqa: F401  (registers the metarl/ ids)

        env = gym.make(env, **dict(env_kwargs or {}))
    _check_spaces(policy, env.observation_space, env.action_space)
    source = _source_params(policy, params)
    if action_scale is not None:
        if not isinstance(policy, GaussianMLPPolicy):
            raise ValueError("action_scale applies to Box actions (a GaussianMLPPolicy) only")
        source = _fold_action_scale(policy, source, env.action_space, action_scale)

    hidden = list(policy.hidden)
    policy_kwargs: dict[str, Any] = {
        "net_arch": {"pi": hidden, "vf": list(hidden if vf_hidden is None else vf_hidden)},
        "activation_fn": _TO_SB3_ACTIVATION[policy.activation],
    }
    log_std = None
    if isinstance(policy, GaussianMLPPolicy):
        # what the metarl policy uses: log_std clamped at its min_std
        log_std = source["log_std"].detach()
        if action_scale is None:  # (a folded log_std was clamped before the shift)
            log_std = log_std.clamp(min=policy.min_log_std)
        policy_kwargs["log_std_init"] = float(log_std.mean())
    ppo_kwargs.setdefault("device", "cpu")
    model = PPO("MlpPolicy", env, policy_kwargs=policy_kwargs, **ppo_kwargs)

    sb3 = model.policy
    linears = [m for m in sb3.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
    names = [*(f"layers.{i}" for i in range(len(policy.layers))), "out"]
    with torch.no_grad():
        for dst, name in zip([*linears, sb3.action_net], names, strict=True):
            dst.weight.copy_(source[f"{name}.weight"])
            dst.bias.copy_(source[f"{name}.bias"])
        if log_std is not None:
            sb3.log_std.copy_(log_std)
    if path is not None:
        save_sb3(model, path)
    return model


def save_sb3(model: Any, path: str | os.PathLike) -> None:
    """Save an SB3 model as a zip at exactly ``path``, atomically.

    SB3's ``save`` closes the stream it writes to, so the zip is built in memory and then
    written through :func:`metarl.core.atomic.atomic_open`. A failed write (read-only, full disk,
    a file in the way) raises :class:`metarl.runs.rundir.RunWriteError` (an ``OSError``) naming ``path``.
    """
    from metarl.runs.rundir import writing

    buffer = _UnclosableBytesIO()
    model.save(buffer)
    with writing(path), atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())


class _UnclosableBytesIO(io.BytesIO):
    """A ``BytesIO`` whose ``close`` keeps the contents (SB3's ``save`` closes its stream)."""

    def close(self) -> None:
        pass


def from_sb3(model: Any) -> Policy:
    """A metarl policy (on CPU) whose parameters are a copy of an SB3 model's actor.

    ``model`` is a PPO or A2C model (or their ``model.policy``, an ``ActorCriticPolicy``) with an
    MLP actor: flat ``Box`` observations, ``FlattenExtractor`` features, ``net_arch`` ``pi``
    layers with ``nn.Tanh`` or ``nn.ReLU``, ``Box`` actions with a diagonal Gaussian
    (state-independent ``log_std``, no gSDE, no squashing) or ``Discrete`` actions. The value
    network is ignored. Raises ``ValueError`` for anything a metarl policy cannot represent,
    including an env wrapped in ``VecNormalize`` with observation normalisation (the policy
    would then see different inputs than SB3's).
    """
    from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor

    sb3 = getattr(model, "policy", model)
    if not isinstance(sb3, ActorCriticPolicy):
        raise ValueError(
            f"only actor-critic models with an ActorCriticPolicy (PPO, A2C) can be converted; "
            f"got a {type(model).__name__} whose policy is a {type(sb3).__name__}"
        )
    normalizer = model.get_vec_normalize_env() if hasattr(model, "get_vec_normalize_env") else None
    if normalizer is not None and normalizer.norm_obs:
        raise ValueError(
            "the model's env normalizes observations with VecNormalize(norm_obs=True), which happens outside "
            "the policy and cannot be represented; use norm_obs=False (reward normalization is fine)"
        )
    if sb3.squash_output:
        raise ValueError(
            "squashed (tanh-bounded) action outputs (squash_output=True) are not supported; "
            "only an unsquashed diagonal Gaussian or a categorical actor converts"
        )
    if sb3.use_sde:
        raise ValueError(
            "gSDE (use_sde=True) exploration noise is state-dependent and not supported; "
            "use use_sde=False (state-independent log_std)"
        )

    obs_space, act_space = sb3.observation_space, sb3.action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"only flat Box(shape=(n,)) observation spaces are supported (MlpPolicy), got {obs_space}")
    extractors = [sb3.features_extractor] if sb3.share_features_extractor else [sb3.pi_features_extractor]
    for extractor in extractors:
        if any(True for _ in extractor.parameters()):
            raise ValueError(
                f"the features extractor {type(extractor).__name__} has trainable layers "
                f"({'shared by actor and critic' if sb3.share_features_extractor else 'before the actor'}); "
                "only the parameter-free FlattenExtractor with the actor's layers in net_arch['pi'] is supported"
            )
        if type(extractor) is not FlattenExtractor:
            raise ValueError(
                f"non-MLP policy: features extractor {type(extractor).__name__} is not supported; "
                "only MlpPolicy (FlattenExtractor) converts"
            )
    if type(sb3.mlp_extractor) is not MlpExtractor:
        raise ValueError(
            f"custom mlp_extractor {type(sb3.mlp_extractor).__name__} is not supported (its actor may "
            "share layers with the critic); only SB3's MlpExtractor with net_arch=dict(pi=..., vf=...) converts"
        )

    policy_net = sb3.mlp_extractor.policy_net
    value_params = {id(p) for p in sb3.mlp_extractor.value_net.parameters()} | {
        id(p) for p in sb3.value_net.parameters()
    }
    if any(id(p) in value_params for p in [*policy_net.parameters(), *sb3.action_net.parameters()]):
        raise ValueError(
            "the actor shares layers with the critic (policy_net and value_net hold the same parameters); "
            "only separate actor layers (net_arch=dict(pi=..., vf=...)) are supported"
        )
    modules = list(policy_net)
    linears = modules[0::2]
    activations = modules[1::2]
    if len(linears) != len(activations) or not all(type(m) is nn.Linear for m in linears):
        raise ValueError(
            f"policy_net must alternate Linear and activation layers, got {[type(m).__name__ for m in modules]}"
        )
    act_types = {type(m) for m in activations}
    if len(act_types) > 1 or not act_types <= set(_FROM_SB3_ACTIVATION):
        raise ValueError(
            f"activation {sorted(t.__name__ for t in act_types)} is not supported; "
            f"supported: {sorted(t.__name__ for t in _FROM_SB3_ACTIVATION)}"
        )
    activation = (
        _FROM_SB3_ACTIVATION[act_types.pop()] if act_types else _FROM_SB3_ACTIVATION.get(sb3.activation_fn, "tanh")
    )
    hidden = [m.out_features for m in linears]
    obs_dim = obs_space.shape[0]

    dist = sb3.action_dist
    if type(dist) is DiagGaussianDistribution and isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        log_std = sb3.log_std.detach().cpu()
        # keep the min_std clamp below every log_std, so the copy acts exactly as SB3's
        min_std = min(1e-6, 0.5 * math.exp(float(log_std.min())))
        ours: Policy = GaussianMLPPolicy(
            obs_dim, act_space.shape[0], hidden=hidden, activation=activation, min_std=min_std
        )
    elif type(dist) is CategoricalDistribution and isinstance(act_space, gym.spaces.Discrete):
        log_std = None
        ours = CategoricalMLPPolicy(obs_dim, int(act_space.n), hidden=hidden, activation=activation)
    else:
        raise ValueError(
            f"action distribution {type(dist).__name__} for {act_space} is not supported; supported: "
            "DiagGaussianDistribution for Box(shape=(n,)), CategoricalDistribution for Discrete"
        )

    with torch.no_grad():
        for dst, src in zip([*ours.layers, ours.out], [*linears, sb3.action_net], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if log_std is not None:
            ours.log_std.copy_(log_std)
    return ours


def _fold_action_scale(
    policy: GaussianMLPPolicy, source: dict[str, torch.Tensor], space: gym.spaces.Box, scale: float
) -> dict[str, torch.Tensor]:
    """The parameters of the policy in env units: the affine action map folded into ``out`` and ``log_std``."""
    clamped = {**source, "log_std": source["log_std"].clamp(min=policy.min_log_std)}
    return fold_action_scale(clamped, space, scale)


def fold_action_scale(
    params: Mapping[str, torch.Tensor], space: gym.spaces.Box, scale: float, *, inverse: bool = False
) -> dict[str, torch.Tensor]:
    """A Gaussian policy's parameters with the action map of ``action_scale`` folded in (policy units
    to env units: mean ``offset + slope * mean``, log-std ``+ log(slope)``), or taken out (``inverse``:
    env units to policy units). Only ``out.weight``, ``out.bias`` and ``log_std`` change."""
    dtype = params["out.bias"].dtype
    offset, slope = (torch.as_tensor(x, dtype=dtype) for x in action_affine(space.low, space.high, scale))
    out = dict(params)
    if inverse:
        out["out.weight"] = params["out.weight"] / slope.unsqueeze(1)
        out["out.bias"] = (params["out.bias"] - offset) / slope
        out["log_std"] = params["log_std"] - slope.log()
    else:
        out["out.weight"] = params["out.weight"] * slope.unsqueeze(1)
        out["out.bias"] = offset + slope * params["out.bias"]
        out["log_std"] = params["log_std"] + slope.log()
    return out


def _source_params(policy: Policy, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``params`` (checked against the policy's own names and shapes), or the policy's parameters."""
    own = policy.params()
    if params is None:
        return own
    if set(params) != set(own):
        raise ValueError(f"params must have the policy's parameter names {sorted(own)}, got {sorted(params)}")
    for name, value in own.items():
        if tuple(params[name].shape) != tuple(value.shape):
            raise ValueError(
                f"params[{name!r}] has shape {tuple(params[name].shape)}, the policy's is {tuple(value.shape)} "
                "(task-batched parameter dicts convert one task at a time: pass {k: v[i] for k, v in params.items()})"
            )
    return dict(params)


def _check_spaces(policy: Policy, obs_space: gym.Space, act_space: gym.Space) -> None:
    """Raise ``ValueError`` when the env's spaces do not fit the policy's input and output sizes."""
    if not isinstance(obs_space, gym.spaces.Box) or obs_space.shape != (policy.obs_dim,):
        raise ValueError(
            f"env observation space {obs_space} does not fit the policy: "
            f"expected Box(shape=({policy.obs_dim},)) for obs_dim={policy.obs_dim}"
        )
    if isinstance(policy, GaussianMLPPolicy):
        if not isinstance(act_space, gym.spaces.Box) or act_space.shape != (policy.act_dim,):
            raise ValueError(
                f"env action space {act_space} does not fit the GaussianMLPPolicy: "
                f"expected Box(shape=({policy.act_dim},)) for act_dim={policy.act_dim}"
            )
    elif not isinstance(act_space, gym.spaces.Discrete) or int(act_space.n) != policy.num_actions:
        raise ValueError(
            f"env action space {act_space} does not fit the CategoricalMLPPolicy: "
            f"expected Discrete({policy.num_actions})"
        )
