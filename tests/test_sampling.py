"""Samplers: exact episode counts and shapes, masks and end flags, seeded determinism, per-task
parameters, and Ray workers (equal to the in-process sampler, surviving a killed worker)."""

from __future__ import annotations

import copy
import math
import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.policies import CategoricalMLPPolicy, GaussianMLPPolicy, make_policy
from metarl.rl.actions import env_actions
from metarl.rl.sampling import VectorSampler, task_seeds

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


def policy_for(sampler, seed=0, **kwargs):
    torch.manual_seed(seed)
    return make_policy(sampler.observation_space, sampler.action_space, **kwargs)


@pytest.mark.parametrize("env_id, horizon", [(NAV, 100), (CHEETAH, 30)])
def test_exact_counts_shapes_and_masks(env_id, horizon):
    sampler = VectorSampler(env_id, episodes_per_task=3, horizon=horizon)
    policy = policy_for(sampler)
    n = 4
    ep = sampler.sample(policy, policy.params(), tasks_of(env_id, n), task_seeds(0, 0, n=n)).check()
    obs_dim = sampler.observation_space.shape[0]
    act_dim = sampler.action_space.shape[0]
    assert ep.observations.shape == (n, horizon, 3, obs_dim)
    assert ep.actions.shape == (n, horizon, 3, act_dim)
    assert ep.rewards.shape == ep.log_probs.shape == ep.mask.shape == (n, horizon, 3)
    assert ep.final_observations.shape == (n, 3, obs_dim)
    assert ep.terminated.shape == ep.lengths.shape == (n, 3)
    # random policies neither reach a goal nor fall over here: every episode runs the horizon
    assert (ep.lengths == horizon).all() and not ep.terminated.any()
    assert ep.num_steps() == n * 3 * horizon
    # the stored log-probs are those of the stored (unclipped) actions under the policy
    with torch.no_grad():
        recomputed = policy(ep.observations, policy.params()).log_prob(ep.actions)
    torch.testing.assert_close(ep.log_probs, recomputed * ep.mask, rtol=1e-5, atol=1e-5)


def test_terminated_episodes_stop_and_keep_their_final_observation():
    sampler = VectorSampler(NAV, episodes_per_task=2, horizon=100)
    policy = policy_for(sampler, init_std=1e-6)  # actions ~ the mean, a few hundredths at most
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()  # mean 0: the point stays at the origin
        policy.log_std.fill_(np.log(1e-6))
    tasks = [{"goal": [0.0, 0.005]}, {"goal": [0.3, 0.3]}]  # the first is reached at step 1
    ep = sampler.sample(policy, policy.params(), tasks, task_seeds(0, 1, n=2)).check()
    assert ep.lengths.tolist() == [[1, 1], [100, 100]]
    assert ep.terminated.tolist() == [[True, True], [False, False]]
    assert ep.mask[0, 0].tolist() == [1.0, 1.0] and ep.mask[0, 1:].sum() == 0
    assert ep.rewards[0, 1:].abs().sum() == 0
    torch.testing.assert_close(ep.rewards[0, 0], torch.full((2,), -0.005), atol=2e-5, rtol=0)
    assert ep.final_observations[0].abs().max() < 1e-4
    torch.testing.assert_close(ep.final_observations[1, 0], ep.observations[1, 99, 0], atol=1e-5, rtol=0)


def test_categorical_policy_samples_by_inverse_cdf():
    policy = CategoricalMLPPolicy(3, 4, hidden=(8,))
    dist = torch.distributions.Categorical(probs=torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4))
    actions = policy.actions_from_noise(dist, torch.tensor([0.05, 0.25, 0.55, 0.99]))
    assert actions.tolist() == [0, 1, 2, 3]
    gaussian = GaussianMLPPolicy(3, 2, hidden=(8,))
    assert gaussian.noise((5, 4), torch.Generator().manual_seed(0)).shape == (5, 4, 2)


@pytest.mark.parametrize(
    "env_id, episodes, hidden",
    [(NAV, 2, (64, 64)), (CHEETAH, 2, (64, 64)), (CHEETAH, 3, (64, 64)), (CHEETAH, 5, (100, 100)), (NAV, 7, (10,))],
)
def test_same_seed_same_episodes_whatever_the_grouping(env_id, episodes, hidden):
    sampler = VectorSampler(env_id, episodes_per_task=episodes, horizon=20)
    policy = policy_for(sampler, hidden=hidden)
    n = 4
    tasks, seeds = tasks_of(env_id, n), task_seeds(3, 7, n=n)
    whole = sampler.sample(policy, policy.params(), tasks, seeds)
    assert equal(whole, sampler.sample(policy, policy.params(), tasks, seeds))
    parts = [sampler.sample(policy, policy.params(), tasks[i : i + 1], seeds[i : i + 1]) for i in range(n)]
    assert equal(whole, type(whole).cat(parts))
    assert whole.success is None  # neither family reports success
    other = sampler.sample(policy, policy.params(), tasks, task_seeds(3, 8, n=n))
    assert not torch.equal(whole.actions, other.actions)


@pytest.mark.parametrize(
    "env_id, env_kwargs",
    [
        (CHEETAH, {}),
        ("metarl/AntDir-v0", {}),
        ("metarl/HopperRandParams-v0", {}),
        ("metarl/MetaWorld-ML1-v0", {"task_name": "push-v3"}),
    ],
)
def test_batched_physics_samples_the_episodes_of_each_envs_own_step(env_id, env_kwargs):
    # The fast paths (envs.batched, envs.metaworld_batch) against the reference path (each env's
    # own step), on one and two physics threads; Ant and Hopper episodes end early (terminations).
    def sampler(**kwargs):
        return VectorSampler(env_id, episodes_per_task=3, horizon=40, env_kwargs=env_kwargs, **kwargs)

    reference = sampler(batch_physics=False)
    policy = policy_for(reference, init_std=2.0)
    probe = gym.make(env_id, **env_kwargs)
    probe.reset(seed=0)
    tasks, seeds = probe.unwrapped.sample_tasks(3), task_seeds(5, 1, n=3)
    expected = reference.sample(policy, policy.params(), tasks, seeds)
    assert not reference.batch_physics
    for threads in (1, 2):
        fast = sampler(physics_threads=threads)
        assert fast.batch_physics
        assert equal(fast.sample(policy, policy.params(), tasks, seeds), expected)
    if env_id in ("metarl/AntDir-v0", "metarl/HopperRandParams-v0"):
        assert expected.terminated.any() and (expected.lengths < 40).any()
    if "MetaWorld" in env_id:
        assert expected.success is not None


def test_per_task_parameters_drive_their_own_tasks():
    sampler = VectorSampler(CHEETAH, episodes_per_task=2, horizon=15)
    policies = [policy_for(sampler, seed=s) for s in range(3)]
    tasks, seeds = tasks_of(CHEETAH, 3), task_seeds(0, 2, n=3)
    stacked = {k: torch.stack([p.params()[k] for p in policies]) for k in policies[0].params()}
    together = sampler.sample(policies[0], stacked, tasks, seeds, per_task=True)
    alone = [sampler.sample(p, p.params(), [t], [s]) for p, t, s in zip(policies, tasks, seeds)]
    assert equal(together, type(together).cat(alone))
    with pytest.raises(ValueError, match="leading dimension of 3"):
        sampler.sample(policies[0], policies[0].params(), tasks, seeds, per_task=True)


def test_env_actions_map_the_scaled_range_onto_the_bounds_by_hand():
    low, high = np.array([-1.0, -2.0]), np.array([1.0, 4.0])
    # scale 10: offset (low + high) / 2 = [0, 1], slope (high - low) / 20 = [0.1, 0.3]
    got = env_actions(np.array([[5.0, -20.0], [-10.0, 10.0], [0.0, 2.0]]), low, high, 10.0)
    np.testing.assert_allclose(got, [[0.5, -2.0], [-1.0, 4.0], [0.0, 1.6]], rtol=1e-12)
    np.testing.assert_allclose(env_actions(np.array([[5.0, -20.0]]), low, high, None), [[1.0, -2.0]])
    with pytest.raises(ValueError, match="finite action bounds"):
        env_actions(np.zeros((1, 1)), np.array([-np.inf]), np.array([1.0]), 2.0)


def test_action_scale_samples_as_a_policy_shrunk_by_the_scale():
    """HalfCheetah's bounds are [-1, 1]: with action_scale 10 the env gets clip(a, -10, 10) / 10, which
    is what an unscaled sampler gives for the policy whose mean and std are divided by 10."""
    scaled = VectorSampler(CHEETAH, episodes_per_task=2, horizon=10, action_scale=10.0)
    plain = VectorSampler(CHEETAH, episodes_per_task=2, horizon=10)
    policy = policy_for(plain, seed=4)
    with torch.no_grad():
        policy.log_std.fill_(math.log(8.0))  # wide: many actions beyond +-10, so the clip matters
    shrunk = copy.deepcopy(policy)
    with torch.no_grad():
        shrunk.out.weight.div_(10.0)
        shrunk.out.bias.div_(10.0)
        shrunk.log_std.sub_(math.log(10.0))
    tasks, seeds = tasks_of(CHEETAH, 2), task_seeds(0, 5, n=2)
    a = scaled.sample(policy, policy.params(), tasks, seeds)
    b = plain.sample(shrunk, shrunk.params(), tasks, seeds)
    assert (a.actions.abs() > 10).any()
    torch.testing.assert_close(a.actions / 10.0, b.actions, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.observations, b.observations, rtol=1e-4, atol=1e-4)
    c = plain.sample(policy, policy.params(), tasks, seeds)  # the same policy without the scale acts otherwise
    assert not torch.allclose(a.rewards, c.rewards, atol=1e-2)
    with pytest.raises(ValueError, match="Box action space"):
        VectorSampler("CartPole-v1", episodes_per_task=1, action_scale=2.0)


def test_task_seeds_are_reproducible_and_distinct():
    assert task_seeds(1, 2, n=5) == task_seeds(1, 2, n=5)
    assert len(set(task_seeds(1, 2, n=100))) == 100
    assert task_seeds(1, 2, n=3) != task_seeds(1, 3, n=3)
    assert all(0 <= s < 2**63 for s in task_seeds(9, n=50))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="episodes_per_task"):
        VectorSampler(NAV, episodes_per_task=0)
    with pytest.raises(ValueError, match="unknown env id"):
        VectorSampler("metarl/Nope-v0", episodes_per_task=1)
    sampler = VectorSampler(NAV, episodes_per_task=1)
    policy = policy_for(sampler)
    with pytest.raises(ValueError, match="one seed per task"):
        sampler.sample(policy, policy.params(), tasks_of(NAV, 2), [1])


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from metarl.rl.sampling import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_sampler_equals_the_in_process_sampler(ray_local, workers):
    from metarl.rl.sampling import RaySampler

    local = VectorSampler(CHEETAH, episodes_per_task=2, horizon=25)
    policy = policy_for(local)
    tasks, seeds = tasks_of(CHEETAH, 5), task_seeds(4, 0, n=5)
    stacked = {k: v.detach() + 0.01 * torch.arange(5.0).view(5, *[1] * v.dim()) for k, v in policy.params().items()}
    sampler = RaySampler(CHEETAH, policy=policy, episodes_per_task=2, horizon=25, num_workers=workers)
    try:
        assert sampler.horizon == local.horizon == 25
        assert equal(sampler.sample(policy.params(), tasks, seeds), local.sample(policy, policy.params(), tasks, seeds))
        assert equal(
            sampler.sample(stacked, tasks, seeds, per_task=True),
            local.sample(policy, stacked, tasks, seeds, per_task=True),
        )
        assert sampler.events == []
    finally:
        sampler.close()


def test_ray_trials_of_a_recurrent_policy_equal_the_in_process_trials(ray_local):
    from agents.recurrent_policy import RecurrentGaussianPolicy
    from metarl.rl.sampling import RaySampler

    local = VectorSampler(CHEETAH, episodes_per_task=4, horizon=12, episodes_per_trial=2)
    torch.manual_seed(0)
    policy = RecurrentGaussianPolicy(local.observation_space.shape[0], local.action_space.shape[0], hidden_size=16)
    tasks, seeds = tasks_of(CHEETAH, 3), task_seeds(1, 1, n=3)
    sampler = RaySampler(CHEETAH, policy=policy, episodes_per_task=4, horizon=12, num_workers=2, episodes_per_trial=2)
    try:
        assert equal(sampler.sample(policy.params(), tasks, seeds), local.sample(policy, policy.params(), tasks, seeds))
    finally:
        sampler.close()


def _killed_worker_run(on_first_ray_wait=None):
    """Sample 8 tasks with 2 workers, SIGKILLing worker 0 before the call, or during it when given
    the ``on_first_ray_wait`` fixture."""
    import ray

    from metarl.rl.sampling import RaySampler

    events = []
    horizon = 1000  # each share is 4 tasks x 8 episodes x 1000 steps: seconds of work
    local = VectorSampler(CHEETAH, episodes_per_task=8, horizon=horizon)
    policy = policy_for(local)
    n = 8
    tasks, seeds = tasks_of(CHEETAH, n), task_seeds(5, 0, n=n)
    sampler = RaySampler(
        CHEETAH, policy=policy, episodes_per_task=8, horizon=horizon, num_workers=2, on_event=events.append
    )
    try:
        victim = sampler.worker_pids()[0]
        if on_first_ray_wait is None:
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:  # until Ray has seen the actor die
                try:
                    ray.get(sampler.workers[0].pid.remote(), timeout=5)
                except Exception:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            episodes = sampler.sample(policy.params(), tasks, seeds)
        else:  # killed the moment the call first waits (every share submitted, none collected): no race

            def kill_victim():
                os.kill(victim, signal.SIGKILL)
                return len(events)  # no worker replaced yet when the kill landed

            killed = on_first_ray_wait(kill_victim)
            episodes = sampler.sample(policy.params(), tasks, seeds)
            assert killed == [0]
        assert episodes.num_tasks == n and episodes.num_steps() == n * 8 * horizon
        assert equal(episodes, local.sample(policy, policy.params(), tasks, seeds))
        assert [e["worker"] for e in events] == [0] and events[0]["tasks"] == [0, 4]
        assert sampler.events == events
        assert victim not in sampler.worker_pids()  # the replacement is a new process
    finally:
        sampler.close()


def test_ray_sampler_replaces_a_worker_killed_mid_call(ray_local, on_first_ray_wait):
    _killed_worker_run(on_first_ray_wait)


def test_ray_sampler_replaces_a_worker_that_died_before_the_call(ray_local):
    _killed_worker_run()


def test_meta_world_episodes_carry_success_flags():
    env_id = "metarl/MetaWorld-ML1-v0"
    sampler = VectorSampler(env_id, episodes_per_task=2, horizon=20, env_kwargs={"task_name": "reach-v3"})
    policy = policy_for(sampler)
    env = gym.make(env_id, task_name="reach-v3")
    env.reset(seed=0)
    tasks = env.unwrapped.sample_tasks(2)
    ep = sampler.sample(policy, policy.params(), tasks, task_seeds(0, n=2)).check()
    assert ep.success is not None and ep.success.shape == (2, 2)
    assert set(ep.success.flatten().tolist()) <= {0.0, 1.0}
    # replay episode 0 of task 1 in a plain env: the flag is whether info["success"] was ever true
    seeds = task_seeds(0, n=2)
    replay = gym.make(env_id, task_name="reach-v3").unwrapped
    replay.set_task(tasks[1])
    obs, _ = replay.reset(seed=int(np.random.SeedSequence(seeds[1]).generate_state(2)[0]))
    np.testing.assert_allclose(obs, ep.observations[1, 0, 0].numpy(), rtol=0, atol=1e-6)
    succeeded = 0.0
    for t in range(20):
        action = np.clip(ep.actions[1, t, 0].numpy(), -1, 1)
        obs, reward, _, _, info = replay.step(action)
        assert reward == pytest.approx(float(ep.rewards[1, t, 0]), rel=1e-5)
        succeeded = max(succeeded, float(info["success"]))
    assert float(ep.success[1, 0]) == succeeded
