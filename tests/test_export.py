"""metarl.app.export: metarl policies <-> stable-baselines3 PPO, exact in parameters, 1e-5 in outputs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
from torch import nn

import envs  # noqa: F401  (registers metarl/*)
from agents.policies import CategoricalMLPPolicy, GaussianMLPPolicy, make_policy
from metarl.app.export import fold_action_scale, from_sb3, to_sb3

NAV = "metarl/Navigation2D-v0"
SMALL = {"n_steps": 16, "batch_size": 16, "seed": 0}  # light rollout buffers; nothing is trained


def _gaussian(*, hidden=(16, 16), activation="tanh", seed=0) -> tuple[GaussianMLPPolicy, gym.Env]:
    torch.manual_seed(seed)
    env = gym.make(NAV)
    policy = make_policy(env.observation_space, env.action_space, hidden=hidden, activation=activation, init_std=0.5)
    with torch.no_grad():  # distinct per-dimension log-std and non-zero biases, so a mix-up shows
        policy.log_std.copy_(torch.tensor([-0.3, -1.2]))
        for p in policy.parameters():
            if p.dim() == 1 and p is not policy.log_std:
                p.normal_(0, 0.02)
    return policy, env


def _categorical(*, hidden=(16, 16), activation="tanh", seed=0) -> tuple[CategoricalMLPPolicy, gym.Env]:
    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    policy = make_policy(env.observation_space, env.action_space, hidden=hidden, activation=activation)
    with torch.no_grad():
        policy.out.weight.mul_(5)  # confident logits: argmax ties impossible
    return policy, env


def _obs(n: int, dim: int, *, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    return scale * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _sb3_dist(model, obs: torch.Tensor) -> torch.distributions.Distribution:
    with torch.no_grad():
        return model.policy.get_distribution(obs.to(model.device)).distribution


# ------------------------------------------------------------------------------------------
# to_sb3: the SB3 actor acts as the metarl policy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gaussian_to_sb3_matches_mean_and_log_std(activation):
    policy, env = _gaussian(activation=activation)
    model = to_sb3(policy, env, ppo_kwargs=SMALL)
    assert isinstance(model, PPO)
    assert (
        type(model.policy.activation_fn) is type
        and model.policy.activation_fn is {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    )
    obs = _obs(64, 2)
    with torch.no_grad():
        ours = policy(obs).mean
    assert torch.allclose(_sb3_dist(model, obs).mean, ours, atol=1e-5, rtol=0)
    assert torch.equal(model.policy.log_std.detach(), policy.log_std.detach())
    # predict clips to the Box bounds (+-0.1): compare with our clipped mean
    actions, _ = model.predict(obs.numpy(), deterministic=True)
    low, high = env.action_space.low, env.action_space.high
    np.testing.assert_allclose(actions, np.clip(ours.numpy(), low, high), atol=1e-5, rtol=0)
    # small observations keep some means inside the bounds, so predict is also checked unclipped
    small = _obs(64, 2, scale=0.01, seed=2)
    with torch.no_grad():
        ours_small = policy(small).mean.numpy()
    assert (np.abs(ours_small) < 0.1).any()
    np.testing.assert_allclose(
        model.predict(small.numpy(), deterministic=True)[0], np.clip(ours_small, low, high), atol=1e-5
    )


def test_action_scale_is_folded_into_the_sb3_actor():
    """A policy trained with action_scale 10 acts in [-10, 10]; SB3's copy acts in the env's units."""
    torch.manual_seed(0)
    env = gym.make("metarl/HalfCheetahVel-v0")
    policy = make_policy(env.observation_space, env.action_space, hidden=(16,), init_std=1.0)
    model = to_sb3(policy, env, ppo_kwargs=SMALL, action_scale=10.0)
    obs = _obs(32, env.observation_space.shape[0])
    with torch.no_grad():
        ours = policy(obs)
    dist = _sb3_dist(model, obs)
    torch.testing.assert_close(dist.mean, ours.mean / 10.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.stddev, ours.stddev / 10.0, rtol=1e-5, atol=1e-7)
    actions, _ = model.predict(obs.numpy(), deterministic=True)
    np.testing.assert_allclose(actions, np.clip(ours.mean.numpy() / 10.0, -1, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Box actions"):
        to_sb3(*_categorical(), ppo_kwargs=SMALL, action_scale=2.0)
    # and back: from_sb3 gives env units; the inverse fold gives the run's policy units again
    back = fold_action_scale(from_sb3(model).params(), env.action_space, 10.0, inverse=True)
    for name, value in policy.params().items():
        torch.testing.assert_close(back[name], value.detach(), rtol=1e-5, atol=1e-6)
    skewed = gym.spaces.Box(np.array([-1.0, 0.0]), np.array([3.0, 1.0]))  # offset [1, 0.5], slope [0.4, 0.1]
    two = {"out.weight": torch.ones(2, 3), "out.bias": torch.tensor([1.0, -2.0]), "log_std": torch.zeros(2)}
    folded = fold_action_scale(two, skewed, 5.0)
    torch.testing.assert_close(folded["out.bias"], torch.tensor([1.4, 0.3]))
    torch.testing.assert_close(folded["out.weight"][:, 0], torch.tensor([0.4, 0.1]))
    torch.testing.assert_close(folded["log_std"], torch.tensor([0.4, 0.1]).log())


def test_categorical_to_sb3_matches_logits_and_argmax():
    policy, env = _categorical()
    model = to_sb3(policy, env, ppo_kwargs=SMALL)
    obs = _obs(64, 4)
    with torch.no_grad():
        ours = policy(obs)
    theirs = _sb3_dist(model, obs)
    assert torch.allclose(theirs.probs, ours.probs, atol=1e-5, rtol=0)
    assert torch.allclose(theirs.logits, ours.logits, atol=1e-5, rtol=0)  # both normalized log-probs
    actions, _ = model.predict(obs.numpy(), deterministic=True)
    np.testing.assert_array_equal(actions, ours.probs.argmax(-1).numpy())
    assert len(set(actions.tolist())) == 2  # both actions occur: the comparison is not vacuous


def test_to_sb3_accepts_env_id_and_value_net_sizes():
    policy, _ = _gaussian(hidden=(8,))
    model = to_sb3(policy, NAV, env_kwargs={"goal_range": (-0.2, 0.2)}, vf_hidden=(4, 4), ppo_kwargs=SMALL)
    value_linears = [m for m in model.policy.mlp_extractor.value_net if isinstance(m, nn.Linear)]
    assert [m.out_features for m in value_linears] == [4, 4]
    assert model.get_env().get_attr("task_spec")[0].fields[0].low == -0.2
    obs = _obs(16, 2)
    with torch.no_grad():
        assert torch.allclose(_sb3_dist(model, obs).mean, policy(obs).mean, atol=1e-5, rtol=0)


def test_to_sb3_copies_an_adapted_parameter_dict():
    policy, env = _gaussian()
    adapted = {name: value.detach() + 0.01 * (i + 1) for i, (name, value) in enumerate(policy.named_parameters())}
    model = to_sb3(policy, env, params=adapted, ppo_kwargs=SMALL)
    obs = _obs(16, 2)
    with torch.no_grad():
        assert torch.allclose(_sb3_dist(model, obs).mean, policy(obs, params=adapted).mean, atol=1e-5, rtol=0)
    assert torch.equal(model.policy.log_std.detach(), adapted["log_std"])
    with pytest.raises(
        ValueError, match=r"params\['out.weight'\] has shape \(3, 2, 16\), the policy's is \(2, 16\) \(task-batched"
    ):
        to_sb3(policy, env, params=adapted | {"out.weight": adapted["out.weight"].expand(3, 2, 16)})
    with pytest.raises(ValueError, match="params must have the policy's parameter names"):
        to_sb3(policy, env, params={"out.weight": adapted["out.weight"]})


def test_log_std_below_min_std_is_copied_clamped():
    policy, env = _gaussian()
    with torch.no_grad():
        policy.log_std.fill_(-50.0)
    model = to_sb3(policy, env, ppo_kwargs=SMALL)
    assert torch.allclose(model.policy.log_std.detach(), torch.full((2,), policy.min_log_std))


# ------------------------------------------------------------------------------------------
# from_sb3 and round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_gaussian, _categorical])
@pytest.mark.parametrize("hidden", [(16, 16), (), (5,)])
def test_round_trip_reproduces_parameters_exactly(make, hidden):
    for activation in ("tanh", "relu"):
        policy, env = make(hidden=hidden, activation=activation)
        back = from_sb3(to_sb3(policy, env, ppo_kwargs=SMALL))
        assert type(back) is type(policy)
        assert back.hidden == policy.hidden and back.activation == policy.activation
        ours, theirs = policy.state_dict(), back.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name


def test_save_load_zip_keeps_actions(tmp_path):
    for make in (_gaussian, _categorical):
        policy, env = make()
        path = tmp_path / f"{make.__name__}.zip"
        model = to_sb3(policy, env, path=path, ppo_kwargs=SMALL)
        assert path.is_file()
        loaded = PPO.load(path, device="cpu")
        obs = _obs(32, policy.obs_dim, scale=0.01)
        np.testing.assert_array_equal(
            loaded.predict(obs.numpy(), deterministic=True)[0], model.predict(obs.numpy(), deterministic=True)[0]
        )
        back = from_sb3(loaded)
        for name, value in policy.state_dict().items():
            assert torch.equal(back.state_dict()[name], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_categorical.zip", "_gaussian.zip"]  # no temp files left


@pytest.mark.parametrize("algo", [PPO, A2C])
def test_from_sb3_of_sb3_built_model(algo):
    """A model SB3 built itself (unequal pi/vf sizes, ReLU, non-default log_std): same outputs."""
    kwargs = {"n_steps": 16, "seed": 0} | ({"batch_size": 16} if algo is PPO else {})
    model = algo(
        "MlpPolicy",
        gym.make(NAV),
        device="cpu",
        **kwargs,
        policy_kwargs={"net_arch": {"pi": [8, 6], "vf": [32]}, "activation_fn": nn.ReLU, "log_std_init": -0.7},
    )
    policy = from_sb3(model)
    assert isinstance(policy, GaussianMLPPolicy)
    assert policy.hidden == (8, 6) and policy.activation == "relu"
    obs = _obs(32, 2)
    with torch.no_grad():
        assert torch.allclose(policy(obs).mean, _sb3_dist(model, obs).mean, atol=1e-6, rtol=0)
        assert torch.allclose(policy(obs).stddev, _sb3_dist(model, obs).stddev, atol=1e-6, rtol=0)
    assert isinstance(from_sb3(model.policy), GaussianMLPPolicy)  # the bare ActorCriticPolicy works too


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_to_sb3_shape_mismatches():
    nav = gym.make(NAV)
    cartpole = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match=r"observation space .* expected Box\(shape=\(3,\)\)"):
        to_sb3(GaussianMLPPolicy(3, 2), nav)
    with pytest.raises(ValueError, match=r"does not fit the GaussianMLPPolicy: expected Box\(shape=\(3,\)\)"):
        to_sb3(GaussianMLPPolicy(2, 3), nav)
    with pytest.raises(ValueError, match=r"does not fit the GaussianMLPPolicy"):
        to_sb3(GaussianMLPPolicy(4, 2), cartpole)
    with pytest.raises(ValueError, match=r"does not fit the CategoricalMLPPolicy: expected Discrete\(3\)"):
        to_sb3(CategoricalMLPPolicy(4, 3), cartpole)
    with pytest.raises(ValueError, match=r"ppo_kwargs may not set \['policy_kwargs'\]"):
        to_sb3(GaussianMLPPolicy(2, 2), nav, ppo_kwargs={"policy_kwargs": {}})
    with pytest.raises(ValueError, match="env_kwargs is only used with an env id"):
        to_sb3(GaussianMLPPolicy(2, 2), nav, env_kwargs={"goal_range": (0, 1)})
    with pytest.raises(ValueError, match="GaussianMLPPolicy or CategoricalMLPPolicy, got Linear"):
        to_sb3(nn.Linear(2, 2), nav)


def _ppo(env=None, **policy_kwargs) -> PPO:
    return PPO("MlpPolicy", env or gym.make(NAV), device="cpu", policy_kwargs=policy_kwargs or None, **SMALL)


class _SharedTrunk(BaseFeaturesExtractor):
    """A trainable features extractor: SB3 2.x's way to share layers between actor and critic."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=8)
        self.net = nn.Sequential(nn.Linear(observation_space.shape[0], 8), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class _DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, shape=(2,))})
    action_space = gym.spaces.Box(-1, 1, shape=(2,))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"x": np.zeros(2, dtype=np.float32)}, {}

    def step(self, action):
        return {"x": np.zeros(2, dtype=np.float32)}, 0.0, True, False, {}


def test_from_sb3_activation_error():
    with pytest.raises(ValueError, match=r"activation \['ELU'\] is not supported; supported: \['ReLU', 'Tanh'\]"):
        from_sb3(_ppo(activation_fn=nn.ELU))


def test_from_sb3_squash_and_sde_errors():
    squashed = PPO(
        "MlpPolicy", gym.make(NAV), device="cpu", use_sde=True, policy_kwargs={"squash_output": True}, **SMALL
    )
    with pytest.raises(
        ValueError, match=r"squashed \(tanh-bounded\) action outputs \(squash_output=True\) are not supported"
    ):
        from_sb3(squashed)
    with pytest.raises(ValueError, match=r"gSDE \(use_sde=True\)"):
        from_sb3(PPO("MlpPolicy", gym.make(NAV), device="cpu", use_sde=True, **SMALL))


def test_from_sb3_shared_layers_errors():
    with pytest.raises(
        ValueError, match=r"features extractor _SharedTrunk has trainable layers \(shared by actor and critic\)"
    ):
        from_sb3(_ppo(features_extractor_class=_SharedTrunk))
    with pytest.raises(ValueError, match=r"trainable layers \(before the actor\)"):
        from_sb3(_ppo(features_extractor_class=_SharedTrunk, share_features_extractor=False))
    model = _ppo(net_arch={"pi": [8], "vf": [8]})
    model.policy.mlp_extractor.value_net = model.policy.mlp_extractor.policy_net  # one set of layers for both
    with pytest.raises(ValueError, match="the actor shares layers with the critic"):
        from_sb3(model)


def test_from_sb3_non_mlp_errors():
    with pytest.raises(ValueError, match=r"only actor-critic models .* got a SAC"):
        from_sb3(SAC("MlpPolicy", gym.make(NAV), buffer_size=8, device="cpu"))
    multi = PPO("MultiInputPolicy", _DictObsEnv(), device="cpu", **SMALL)
    with pytest.raises(ValueError, match=r"only flat Box\(shape=\(n,\)\) observation spaces are supported .* got Dict"):
        from_sb3(multi)
    with pytest.raises(ValueError, match="VecNormalize"):
        from_sb3(PPO("MlpPolicy", VecNormalize(DummyVecEnv([lambda: gym.make(NAV)])), device="cpu", **SMALL))
