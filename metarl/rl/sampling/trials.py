"""Trials for recurrent policies (RL^2): ``K`` consecutive episodes of one task, the state carried across.

A :class:`~metarl.rl.sampling.VectorSampler` with ``episodes_per_trial = K`` and a recurrent policy
(``policy.recurrent``, e.g. :class:`agents.recurrent_policy.RecurrentGaussianPolicy`) runs, for each
of the ``N`` tasks, ``R = E / K`` trials side by side (one env slot each, slot ``n * R + r``):

    for k in 0 .. K-1:                  # the trial's episodes, one after the other
        reset every slot (the seed of episode r * K + k of its task)
        for t in 0 .. H-1:              # the running slots only
            x     = [obs_t, a_prev, r_prev, d_prev]     # d_prev = 1 at the first step of episodes k > 0
            state = cell(x, state)                      # carried over from episode k - 1
            a_t   = mean(state) + std * noise[task][t, r * K + k]

A slot whose episode ended waits (its state, previous action and reward stay) until the others
end theirs or reach the horizon. The state starts at zero for every trial (every call).

The result is an ordinary :class:`~metarl.rl.episodes.Episodes` ``[N, H, E]`` with episode
``e = r * K + k`` of each task: episode ``k`` of trial ``r``; :func:`metarl.rl.trials.trial_sequences`
puts a trial's episodes back into one sequence with the same inputs. The randomness is drawn per
task as for feed-forward policies (the noise ``[H, E]`` and the reset seeds of its ``E``
episodes), and every tensor op runs on per-task blocks padded to whole CPU vectors, so a trial
depends only on its task, its seed and the parameters, never on the other tasks of the call or
on the number of Ray workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metarl.rl.episodes import Episodes
from metarl.rl.sampling.padding import padded


def sample_trials(sampler: Any, policy: torch.nn.Module, params: dict[str, torch.Tensor], tasks, seeds) -> Episodes:
    """``E`` episodes (``E / K`` trials of ``K``) of each task; ``params`` per task ``[N, ...]``."""
    n, e, h, k_trial = len(tasks), sampler.episodes_per_task, sampler.horizon, sampler.episodes_per_trial
    trials = e // k_trial
    slots = n * trials
    batch = sampler._envs(slots)
    batch.set_tasks([task for task in tasks for _ in range(trials)])

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([policy.noise((h, e), g) for g in gens])  # [N, H, E, act_dim]
    reset_seeds = np.concatenate([np.random.SeedSequence(int(s)).generate_state(e) for s in seeds])  # [N * E]

    act_dim, obs_dim = policy.act_dim, policy.obs_dim
    gates = 3 if policy.cell_type == "gru" else 4
    widths = (policy.input_dim, policy.hidden_size, gates * policy.hidden_size, policy.state_dim, act_dim, 1)
    r_pad = padded(trials, widths, rows=4)  # per-task blocks of whole CPU vectors (see VectorSampler._sample)

    m = n * e
    obs_buf = torch.zeros(h, m, obs_dim)
    act_buf = torch.zeros(h, m, act_dim)
    logp_buf = torch.zeros(h, m)
    rew_buf = np.zeros((h, m), dtype=np.float32)
    mask_buf = np.zeros((h, m), dtype=np.float32)
    final_obs = np.zeros((m, obs_dim), dtype=np.float32)
    terminated_out = np.zeros(m, dtype=bool)
    lengths = np.zeros(m, dtype=np.int64)
    success = np.zeros(m, dtype=np.float32)
    reports_success = False
    action_map = sampler._action_map

    state = policy.initial_state(n, r_pad)
    obs_pad = torch.zeros(n, r_pad, obs_dim)
    prev_action = torch.zeros(n, r_pad, act_dim)
    prev_reward = torch.zeros(n, r_pad)
    done = torch.zeros(n, r_pad)
    noise_pad = torch.zeros(n, r_pad, act_dim)
    run_pad = torch.zeros(n, r_pad, 1, dtype=torch.bool)  # padding rows never run
    slot_of = np.arange(slots)
    for k in range(k_trial):
        cols = slot_of * k_trial + k  # episode r * K + k of task n, in the [N * E] episode order
        obs = batch.reset(reset_seeds[cols])
        running = np.ones(slots, dtype=bool)
        noise_k = noise[:, :, k::k_trial]  # [N, H, R, act_dim]: the noise of episode r * K + k
        if k > 0:
            done[:, :trials] = 1.0
        for t in range(h):
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            run_t = torch.from_numpy(running)
            run_pad[:, :trials, 0] = run_t.view(n, trials)
            obs_pad[:, :trials] = obs_t.view(n, trials, obs_dim)
            x = policy.inputs(obs_pad, prev_action, prev_reward, done)
            state = torch.where(run_pad, policy.cell(x, state, params), state)
            dist = policy.distribution(policy.outputs_of_state(state, params))
            noise_pad[:, :trials] = noise_k[:, t]
            actions_pad = policy.actions_from_noise(dist, noise_pad)
            log_probs = dist.log_prob(actions_pad)[:, :trials].reshape(slots)
            actions = actions_pad[:, :trials].reshape(slots, act_dim)
            obs_buf[t, cols] = obs_t * run_t[:, None]
            act_buf[t, cols] = actions * run_t[:, None]
            logp_buf[t, cols] = log_probs * run_t
            env_actions = actions.numpy()
            if action_map is not None:
                env_actions = action_map(env_actions)
            obs, rewards, terminated, truncated = batch.step(env_actions, running)
            rewards = np.where(running, rewards, 0.0).astype(np.float32)
            rew_buf[t, cols] = rewards
            mask_buf[t, cols] = running
            # what the next step reads: this step's action and reward, where the slot ran
            prev_action = torch.where(run_pad, actions_pad, prev_action)
            ran = run_pad[:, :trials, 0]
            prev_reward[:, :trials][ran] = torch.from_numpy(rewards).view(n, trials)[ran]
            done[:, :trials][ran] = 0.0
            ended = running & (terminated | truncated | (t == h - 1))
            final_obs[cols[ended]] = obs[ended]
            terminated_out[cols[ended]] = terminated[ended]
            lengths[cols[ended]] = t + 1
            running = running & ~ended
            if not running.any():
                break
        if getattr(batch, "reports_success", False):
            reports_success = True
            success[cols] = batch.success

    return Episodes.from_step_major(
        n,
        observations=obs_buf,
        actions=act_buf,
        rewards=rew_buf,
        log_probs=logp_buf,
        mask=mask_buf,
        final_observations=final_obs,
        terminated=terminated_out,
        lengths=lengths,
        success=success if reports_success else None,
    )
