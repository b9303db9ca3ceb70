"""RL^2: the recurrent policy, the trial sampler, trials as sequences, GAE over trials, PPO's loss.

The sampler's step-by-step cell is checked against ``torch.nn.GRU`` / ``LSTM``; the trial sampler
against a replay of its episodes as sequences (the same inputs reproduce its log-probabilities,
which they would not if the state were reset between a trial's episodes, or carried into the next
trial); GAE and the clipped loss against values worked out by hand.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.recurrent_policy import RecurrentGaussianPolicy
from agents.rl2 import RL2
from metarl.rl.episodes import Episodes
from metarl.rl.objective import RLBatch, StepData, clipped_surrogate
from metarl.rl.sampling import VectorSampler, task_seeds
from metarl.rl.trials import trial_gae, trial_sequences

NAV = "metarl/Navigation2D-v0"
CHEETAH = "metarl/HalfCheetahVel-v0"


def tasks_of(env_id, n, seed=0):
    env = gym.make(env_id)
    env.reset(seed=seed)
    return env.unwrapped.sample_tasks(n)


def equal(a, b) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


def recurrent_policy(sampler, cell="gru", hidden=32, seed=0):
    torch.manual_seed(seed)
    obs_dim, act_dim = sampler.observation_space.shape[0], sampler.action_space.shape[0]
    policy = RecurrentGaussianPolicy(obs_dim, act_dim, hidden_size=hidden, cell=cell, init_std=0.5)
    with torch.no_grad():  # non-zero heads, so every input moves the actions
        policy.out.weight.normal_(0, 0.5)
        policy.out.bias.normal_(0, 0.1)
    return policy


# ----------------------------------------------------------------------------- the cell


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_step_cell_equals_torch_rnn(cell):
    torch.manual_seed(1)
    policy = RecurrentGaussianPolicy(5, 2, hidden_size=8, cell=cell)
    n, b, t_len = 3, 4, 6
    x = torch.randn(n * b, t_len, policy.input_dim)
    with torch.no_grad():
        expected = policy.sequence(x)  # torch.nn.GRU / LSTM over the whole sequence
        params = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in policy.params().items()}
        state = policy.initial_state(n, b)
        for t in range(t_len):
            state = policy.cell(x[:, t].view(n, b, -1), state, params)
            torch.testing.assert_close(state[..., :8].reshape(n * b, 8), expected[:, t], rtol=1e-5, atol=1e-6)
    assert state.shape == (n, b, 16 if cell == "lstm" else 8)


def test_inputs_are_observation_previous_action_reward_and_done():
    x = RecurrentGaussianPolicy.inputs(
        torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]), torch.tensor([4.0]), torch.tensor([1.0])
    )
    assert x.tolist() == [[1.0, 2.0, 3.0, 4.0, 1.0]]


# ----------------------------------------------------------------------------- trials as sequences


def _hand_episodes() -> Episodes:
    """One task, two trials of two episodes (E = 4, H = 3); episode 0 ends after 2 steps,
    episode 3 after 1; the others run the horizon. Step values encode (episode, time)."""
    n, h, e = 1, 3, 4
    lengths = torch.tensor([[2, 3, 3, 1]])
    mask = (torch.arange(h).view(1, h, 1) < lengths.view(1, 1, e)).float()
    code = (10 * torch.arange(e).view(1, 1, e) + torch.arange(h).view(1, h, 1)).float()  # 10 e + t
    return Episodes(
        observations=(code * mask).unsqueeze(-1),
        actions=(-code * mask).unsqueeze(-1),
        rewards=(code + 0.5) * mask,
        log_probs=-code * mask / 100,
        mask=mask,
        final_observations=torch.zeros(n, e, 1),
        terminated=torch.tensor([[True, False, False, True]]),
        lengths=lengths,
    ).check()


def test_trial_sequences_lay_out_each_trial_episode_after_episode():
    seqs = trial_sequences(_hand_episodes(), episodes_per_trial=2)
    # trial 0 = episodes 0 (2 steps) and 1 (3 steps); trial 1 = episodes 2 (3 steps) and 3 (1 step)
    assert seqs.mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert seqs.observations[..., 0].tolist() == [[0, 1, 10, 11, 12, 0], [20, 21, 22, 30, 0, 0]]
    assert seqs.episode.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 2, 2]]
    assert seqs.done.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
    # the previous step's action and reward, across the episode boundary, zero at the start
    assert seqs.prev_actions[..., 0].tolist() == [[0, 0, -1, -10, -11, -12], [0, -20, -21, -22, -30, 0]]
    assert seqs.prev_rewards.tolist() == [[0, 0.5, 1.5, 10.5, 11.5, 12.5], [0, 20.5, 21.5, 22.5, 30.5, 0]]
    expected = torch.tensor([[0, -0.01, -0.1, -0.11, -0.12, 0], [-0.2, -0.21, -0.22, -0.3, 0, 0]])
    torch.testing.assert_close(seqs.log_probs, expected)


def test_trial_gae_by_hand():
    # one trial of 3 real steps then padding; gamma 0.5, lambda 0.5
    rewards = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = trial_gae(rewards, values, mask, gamma=0.5, gae_lambda=0.5)
    d2 = 4.0 - 2.0  # last real step: nothing follows (the padding's value 9 is not used)
    d1 = 2.0 + 0.5 * 2.0 - 1.0
    d0 = 1.0 + 0.5 * 1.0 - 0.5
    a2, a1 = d2, d1 + 0.25 * d2
    a0 = d0 + 0.25 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    # lambda 1, gamma 1: returns-to-go minus the value
    adv = trial_gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    torch.testing.assert_close(adv, torch.tensor([[7 - 0.5, 6 - 1.0, 4 - 2.0, 0.0]]))


def test_ppo_clip_loss_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    loss, ratio = clipped_surrogate(new, old, adv, 0.2)
    # r = 1.5, A > 0: clipped to 1.2; r = 0.5, A < 0: clipped to 0.8 (the pessimistic -0.8);
    # r = 1.1 inside the range; r = 0.5, A > 0: unclipped 0.5 is the smaller
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -2.2, -0.5])
    assert ratio.tolist() == pytest.approx([1.5, 0.5, 1.1, 0.5])


# ----------------------------------------------------------------------------- the trial sampler


def _replayed_log_probs(policy, episodes, k):
    seqs = trial_sequences(episodes, k)
    with torch.no_grad():
        x = policy.inputs(seqs.observations, seqs.prev_actions, seqs.prev_rewards, seqs.done)
        outputs, _ = policy.heads(policy.sequence(x))
        return policy.distribution(outputs).log_prob(seqs.actions) * seqs.mask, seqs


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_trial_sampler_carries_the_state_across_a_trials_episodes(cell):
    k = 3
    sampler = VectorSampler(NAV, episodes_per_task=2 * k, horizon=20, episodes_per_trial=k)
    policy = recurrent_policy(sampler, cell=cell)
    tasks, seeds = tasks_of(NAV, 2), task_seeds(0, 0, n=2)
    episodes = sampler.sample(policy, policy.params(), tasks, seeds).check()
    assert episodes.episodes_per_task == 2 * k and (episodes.lengths == 20).all()
    # replaying each trial as one sequence (state carried, inputs rebuilt) gives the sampled log-probs
    replay, seqs = _replayed_log_probs(policy, episodes, k)
    sampled = seqs.log_probs
    torch.testing.assert_close(replay, sampled, rtol=1e-4, atol=1e-4)
    # ... which a state reset at every episode does not (K = 1: every episode its own trial):
    # the same for each trial's first episode, different for the later ones
    reset_each, _ = _replayed_log_probs(policy, episodes, 1)
    reset_each, carried = reset_each.view(2, 2, k, 20), sampled.view(2, 2, k, 20)
    torch.testing.assert_close(reset_each[:, :, 0], carried[:, :, 0], rtol=1e-4, atol=1e-4)
    assert (reset_each[:, :, 1:] - carried[:, :, 1:]).abs().max() > 1e-2
    # a second call starts every trial from the initial state again: the same episodes
    assert equal(episodes, sampler.sample(policy, policy.params(), tasks, seeds))


def test_trial_sampler_reads_the_previous_reward():
    # a policy that only looks at the previous reward input: episodes depend on it step by step
    k = 2
    sampler = VectorSampler(NAV, episodes_per_task=k, horizon=10, episodes_per_trial=k)
    policy = recurrent_policy(sampler)
    episodes = sampler.sample(policy, policy.params(), tasks_of(NAV, 1), task_seeds(0, 1, n=1))
    seqs = trial_sequences(episodes, k)
    with torch.no_grad():
        x = policy.inputs(seqs.observations, seqs.prev_actions, seqs.prev_rewards * 0, seqs.done)
        outputs, _ = policy.heads(policy.sequence(x))
        wrong = policy.distribution(outputs).log_prob(seqs.actions)
    assert (wrong[:, 1:] - seqs.log_probs[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("env_id, k, trials", [(NAV, 2, 3), (CHEETAH, 2, 1), (CHEETAH, 3, 2)])
def test_trials_do_not_depend_on_the_grouping_of_tasks(env_id, k, trials):
    sampler = VectorSampler(env_id, episodes_per_task=k * trials, horizon=15, episodes_per_trial=k)
    policy = recurrent_policy(sampler)
    n = 4
    tasks, seeds = tasks_of(env_id, n), task_seeds(2, 5, n=n)
    whole = sampler.sample(policy, policy.params(), tasks, seeds)
    parts = [sampler.sample(policy, policy.params(), tasks[i : i + 1], seeds[i : i + 1]) for i in range(n)]
    assert equal(whole, Episodes.cat(parts))
    assert not equal(whole, sampler.sample(policy, policy.params(), tasks, task_seeds(2, 6, n=n)))


def test_trial_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of episodes_per_trial"):
        VectorSampler(NAV, episodes_per_task=5, episodes_per_trial=2)
    sampler = VectorSampler(NAV, episodes_per_task=4, horizon=5, episodes_per_trial=2)
    from agents.policies import make_policy

    mlp = make_policy(sampler.observation_space, sampler.action_space)
    with pytest.raises(ValueError, match="needs a recurrent policy"):
        sampler.sample(mlp, mlp.params(), tasks_of(NAV, 1), [0])


# ----------------------------------------------------------------------------- the learner


def test_rl2_step_reduces_its_loss_and_leaves_the_old_policy_behind():
    k = 2
    sampler = VectorSampler(NAV, episodes_per_task=2 * k, horizon=20, episodes_per_trial=k)
    policy = recurrent_policy(sampler, hidden=16)
    episodes = sampler.sample(policy, policy.params(), tasks_of(NAV, 3), task_seeds(0, 2, n=3))
    batch = RLBatch([], StepData(episodes, torch.zeros_like(episodes.rewards)))
    learner = RL2(policy, episodes_per_trial=k, lr=1e-3, epochs=3, minibatches=2, seed=4)
    data = learner.prepare(batch)
    # at the sampling parameters the recomputed log-probs are the sampled ones (ratio 1)
    torch.testing.assert_close(data["old_log_probs"] * data["mask"], trial_sequences(episodes, k).log_probs,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    before = {k_: v.clone() for k_, v in policy.state_dict().items()}
    with torch.no_grad():
        loss_before = float(learner.losses(data)["loss/policy"])
    metrics = learner.step(batch, 0)
    assert metrics["updates"] == 3 * 2
    with torch.no_grad():
        loss_after = float(learner.losses(data)["loss/policy"])
    assert loss_after < loss_before  # the clipped surrogate went down on its own data
    assert any(not torch.equal(before[k_], v) for k_, v in policy.state_dict().items())
    assert math.isfinite(metrics["explained_variance"])


def test_rl2_return_statistics_merge_as_one_batch():
    policy = RecurrentGaussianPolicy(2, 1, hidden_size=4)
    learner = RL2(policy, episodes_per_trial=1)
    learner.return_mean, learner.return_var, learner.return_count = 0.0, 1.0, 0.0
    a = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[10.0, 20.0, 0.0, 0.0]])
    mb = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    learner._update_return_statistics(a, m)
    learner._update_return_statistics(b, mb)
    values = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    assert learner.return_mean == pytest.approx(values.mean())
    assert learner.return_var == pytest.approx(values.var())
    assert learner.return_count == 5


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("navigation2d/rl2.yaml", ["policy.recurrent=null"], "policy.recurrent: rl2 needs a recurrent policy"),
        ("navigation2d/maml_trpo.yaml", ["policy.recurrent=gru"], "policy.recurrent: must be null for maml_trpo"),
        ("navigation2d/maml_trpo.yaml", ["episodes_per_trial=2"], "episodes_per_trial: must be 1 for maml_trpo"),
        ("navigation2d/rl2.yaml", ["episodes_per_task=10", "episodes_per_trial=4"], "multiple of episodes_per_trial"),
        ("navigation2d/rl2.yaml", ["eval.episodes_per_task=5"], "eval.episodes_per_task: must be null for rl2"),
    ],
)
def test_rl2_config_combinations_are_checked(config, overrides, message):
    from pathlib import Path

    from metarl.core.config import ConfigError
    from metarl.core.config_files import load_config
    from metarl.runs.rl_config import RLConfig

    path = Path(__file__).resolve().parents[1] / "experiments" / config
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig, path, overrides)
