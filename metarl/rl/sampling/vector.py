"""In-process vectorized sampler: all envs of all tasks of a meta-batch step in lock-step.

``VectorSampler(env_id, episodes_per_task=E)`` keeps a batch of ``N * E`` envs (env ``n * E + e``
runs episode ``e`` of task ``n``) and, per call, runs exactly one episode in each env:

- one batched policy forward per time step for every env at once; the parameters can be shared
  (``{name: [...]}``) or per task (``{name: [N, ...]}``, e.g. the inner-loop adapted dicts,
  stacked), in which case each task's envs go through that task's parameters;
- all randomness is drawn up front per task from that task's seed: the policy noise
  (``[H, E, ...]`` from a ``torch.Generator``) and the env reset seeds (from
  ``numpy.random.SeedSequence(seed)``), so an episode depends only on its task, its seed and
  the parameters, never on which other tasks share the batch or the worker;
- envs whose episode ended are not stepped again (the mask marks their steps); the call returns
  when every episode has ended or the horizon ``H`` is reached (truncation).

Families with a native vector env (Navigation2D) step all envs in one array operation; the
MuJoCo locomotion families (HalfCheetah, Ant, Hopper, Walker2d, rand-params included) step the
physics of all running envs per call and compute observations, rewards and terminations for all
of them in NumPy (:mod:`envs.batched`: the same episodes as the envs' own ``step``); the others
(Meta-World) step a list of unwrapped envs in a plain loop that only touches the running ones (no
gymnasium wrappers, no info merging: the sampler needs observations, rewards and the two end
flags). Actions are clipped to a ``Box`` action space (or mapped onto it from
``[-action_scale, action_scale]``: :mod:`metarl.rl.actions`) before they reach the env; the
episodes keep the policy's own actions, whose log-probabilities they store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401  (registers the metarl/ families)
from envs.batched import batched_kind
from envs.metaworld_tasks import MetaWorldEnv
from metarl.rl.actions import ActionMap
from metarl.rl.episodes import Episodes
from metarl.rl.sampling.env_batches import ListBatch, MetaWorldListBatch, NativeBatch, PhysicsListBatch
from metarl.rl.sampling.padding import padded as _padded
from metarl.rl.sampling.trials import sample_trials


def task_seeds(seed: int, *keys: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds for the tasks of one sampling call.

    Derived from ``(seed, *keys)`` with ``numpy.random.SeedSequence`` (e.g. keys = iteration and
    phase), so every sampling call of a run gets its own, reproducible seeds.
    """
    state = np.random.SeedSequence([seed, *keys]).generate_state(n, dtype=np.uint64)
    return [int(s) >> 1 for s in state]


def _spec(env_id: str):
    try:
        return gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(f"unknown env id {env_id!r}: {e}") from None


def resolve_horizon(env_id: str, horizon: int | None) -> int:
    """The longest episode: ``horizon``, or else the registration's ``max_episode_steps``."""
    h = int(horizon if horizon is not None else _spec(env_id).max_episode_steps or 0)
    if h < 1:
        raise ValueError(f"horizon must be >= 1 (none given and {env_id} registers no max_episode_steps)")
    return h


class VectorSampler:
    """Samples ``episodes_per_task`` episodes for each task of a meta-batch, all in lock-step.

    Args:
        env_id: a registered task family, e.g. ``"metarl/HalfCheetahVel-v0"``.
        episodes_per_task: episodes per task and call (``E``).
        horizon: the longest episode (``H``); default: the registration's ``max_episode_steps``.
        env_kwargs: constructor arguments of the env.
        action_scale: policy actions in ``[-action_scale, action_scale]`` map onto the env's
            bounds (:mod:`metarl.rl.actions`); None: they are clipped to the bounds.
        batch_physics: step the MuJoCo locomotion families with :class:`envs.batched.PhysicsBatch`
            (the same episodes; False: each env's own ``step``, the reference path).
        physics_threads: threads stepping that physics (MuJoCo releases the GIL).
        episodes_per_trial: for a recurrent policy (RL^2), the episodes of one trial (``K``): each
            task's ``E`` episodes are ``E / K`` trials, its state carried across a trial's episodes
            (:mod:`metarl.rl.sampling.trials`). Feed-forward policies need 1.
    """

    def __init__(
        self,
        env_id: str,
        *,
        episodes_per_task: int,
        horizon: int | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        action_scale: float | None = None,
        batch_physics: bool = True,
        physics_threads: int = 1,
        episodes_per_trial: int = 1,
    ) -> None:
        if episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
        if episodes_per_trial < 1 or episodes_per_task % episodes_per_trial:
            raise ValueError(
                f"episodes_per_task ({episodes_per_task}) must be a multiple of episodes_per_trial "
                f"({episodes_per_trial}, >= 1): each task's episodes are whole trials"
            )
        self.episodes_per_trial = int(episodes_per_trial)
        spec = _spec(env_id)
        self.env_id = env_id
        self.episodes_per_task = episodes_per_task
        self.horizon = resolve_horizon(env_id, horizon)
        self.env_kwargs = dict(env_kwargs or {})
        self._native = spec.vector_entry_point is not None
        self._batch: NativeBatch | ListBatch | None = None
        if physics_threads < 1:
            raise ValueError(f"physics_threads must be >= 1, got {physics_threads}")
        probe = gym.make(env_id, disable_env_checker=True, **self.env_kwargs)
        self.observation_space = probe.observation_space
        self.action_space = probe.action_space
        kind = "metaworld" if isinstance(probe.unwrapped, MetaWorldEnv) else batched_kind(probe.unwrapped)
        self.batch_physics = bool(batch_physics) and not self._native and kind is not None
        self._batch_class = MetaWorldListBatch if kind == "metaworld" else PhysicsListBatch
        self.physics_threads = int(physics_threads)
        probe.close()
        self.action_scale = action_scale
        self._action_map = None
        if isinstance(self.action_space, gym.spaces.Box):  # checks the bounds once
            self._action_map = ActionMap(self.action_space.low, self.action_space.high, action_scale)
        elif action_scale is not None:
            raise ValueError(f"action_scale needs a Box action space; {env_id} has {self.action_space}")

    def _envs(self, num_envs: int) -> NativeBatch | ListBatch:
        if self._batch is None or self._batch.num_envs != num_envs:
            if self._batch is not None:
                self._batch.close()
            if self._native:
                self._batch = NativeBatch(self.env_id, num_envs, self.horizon, self.env_kwargs)
            elif self.batch_physics:
                args = (self.env_id, num_envs, self.horizon, self.env_kwargs, self.physics_threads)
                self._batch = self._batch_class(*args)
            else:
                self._batch = ListBatch(self.env_id, num_envs, self.horizon, self.env_kwargs)
        return self._batch

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def bind(self, policy: torch.nn.Module) -> BoundSampler:
        """This sampler with ``policy`` fixed: ``sample(params, tasks, seeds)``, as a RaySampler's."""
        return BoundSampler(self, policy)

    def sample(
        self,
        policy: torch.nn.Module,
        params: Mapping[str, torch.Tensor],
        tasks: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        *,
        per_task: bool = False,
    ) -> Episodes:
        """``E`` episodes of each task (one per env), on CPU.

        ``params``: the policy's parameter dict, shared by all tasks, or with ``per_task=True``
        stacked per task (``[N, ...]``, e.g. adapted parameters). ``seeds``: one per task
        (:func:`task_seeds`).
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-step tensors are small: extra threads only spin (100x slower on a busy CPU)
        try:
            with torch.no_grad():
                return self._sample(policy, params, tasks, seeds, per_task)
        finally:
            torch.set_num_threads(threads)

    def _sample(self, policy, params, tasks, seeds, per_task) -> Episodes:
        n, e, h = len(tasks), self.episodes_per_task, self.horizon
        if len(seeds) != n:
            raise ValueError(f"need one seed per task: {n} tasks, {len(seeds)} seeds")
        if n == 0:
            raise ValueError("sample needs at least one task")
        params = _per_task(params, n, per_task)
        if getattr(policy, "recurrent", False):
            return sample_trials(self, policy, params, tasks, seeds)
        if self.episodes_per_trial != 1:
            raise ValueError(
                f"episodes_per_trial={self.episodes_per_trial} needs a recurrent policy (RL^2); "
                f"{type(policy).__name__} is feed-forward (use 1)"
            )
        m = n * e
        batch = self._envs(m)
        batch.set_tasks([task for task in tasks for _ in range(e)])

        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.stack([policy.noise((h, e), g) for g in gens])  # [N, H, E, ...]
        reset_seeds = np.concatenate([np.random.SeedSequence(int(s)).generate_state(e) for s in seeds])
        obs = batch.reset(reset_seeds)

        obs_dim = obs.shape[-1]
        act_shape = noise.shape[3:]
        obs_buf = torch.zeros(h, m, obs_dim)
        act_buf = torch.zeros(h, m, *act_shape, dtype=torch.int64 if policy.discrete else torch.float32)
        logp_buf = torch.zeros(h, m)
        rew_buf = np.zeros((h, m), dtype=np.float32)
        mask_buf = np.zeros((h, m), dtype=np.float32)
        final_obs = np.zeros((m, obs_dim), dtype=np.float32)
        terminated_out = np.zeros(m, dtype=bool)
        lengths = np.zeros(m, dtype=np.int64)
        running = np.ones(m, dtype=bool)
        action_map = self._action_map

        # Every elementwise op runs on tensors whose per-task block is a whole number of CPU
        # vector lengths (PAD floats): no element goes through a scalar tail loop (whose rounding
        # differs), so a task's numbers do not depend on how many tasks share the call. The
        # trunk (hidden layers) runs on episodes padded to e_trunk per task, the distribution
        # (mean/std/log-prob, a few floats per episode) on episodes padded to e_out.
        # (the trunk's batched matmuls get a multiple of 4 rows per task: with 3, the BLAS
        # picks kernels whose rounding depends on the number of tasks, measured with 3 rows)
        e_trunk = _padded(e, policy.hidden, rows=4)
        e_out = _padded(e, (policy.out.out_features,))
        obs_pad = torch.zeros(n, e_trunk, obs_dim)
        noise = torch.cat([noise, noise.new_zeros(n, h, e_out - e, *noise.shape[3:])], dim=2)
        for t in range(h):
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            obs_pad[:, :e] = obs_t.view(n, e, obs_dim)
            outputs = tuple(_pad_episodes(o[:, :e], e_out) for o in policy.outputs(obs_pad, params))
            dist = policy.distribution(outputs)
            actions_pad = policy.actions_from_noise(dist, noise[:, t])
            actions, log_probs = actions_pad[:, :e], dist.log_prob(actions_pad)[:, :e]
            run_t = torch.from_numpy(running)
            obs_buf[t] = obs_t * run_t[:, None]
            act_buf[t] = actions.reshape(m, *act_shape) * (run_t.view(m, *([1] * len(act_shape))))
            logp_buf[t] = log_probs.reshape(m) * run_t
            env_actions = actions.reshape(m, *act_shape).numpy()
            if action_map is not None:
                env_actions = action_map(env_actions)
            obs, rewards, terminated, truncated = batch.step(env_actions, running)
            rew_buf[t] = np.where(running, rewards, 0.0)
            mask_buf[t] = running
            ended = running & (terminated | truncated | (t == h - 1))
            final_obs[ended] = obs[ended]
            terminated_out[ended] = terminated[ended]
            lengths[ended] = t + 1
            running = running & ~ended
            if not running.any():
                break

        success = batch.success.copy() if getattr(batch, "reports_success", False) else None

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
            success=success,
        )


def _pad_episodes(x: torch.Tensor, e_out: int) -> torch.Tensor:
    """``[N, E, ...] -> [N, e_out, ...]`` with zeros appended along the episode dimension."""
    if x.shape[1] == e_out:
        return x.contiguous()
    pad = x.new_zeros(x.shape[0], e_out - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)


def _per_task(params: Mapping[str, torch.Tensor], n: int, per_task: bool) -> dict[str, torch.Tensor]:
    """Parameters with a leading task dimension ``N``; shared ones are expanded (no copy).

    Every call then runs the same per-task batched matmuls whatever ``N`` is, so an episode's
    numbers do not depend on how many tasks share the call.
    """
    if per_task:
        for name, p in params.items():
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(
                    f"per-task parameter {name!r} must have a leading dimension of {n} (tasks), "
                    f"got shape {tuple(p.shape)}"
                )
        return {name: p.detach() for name, p in params.items()}
    return {name: p.detach().unsqueeze(0).expand(n, *p.shape) for name, p in params.items()}


class BoundSampler:
    """A :class:`VectorSampler` bound to a policy module: the call signature of the Ray sampler."""

    def __init__(self, sampler: VectorSampler, policy: torch.nn.Module) -> None:
        self.sampler = sampler
        self.policy = policy
        self.horizon = sampler.horizon

    def sample(
        self,
        params: Mapping[str, torch.Tensor],
        tasks: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        *,
        per_task: bool = False,
    ) -> Episodes:
        return self.sampler.sample(self.policy, params, tasks, seeds, per_task=per_task)

    def close(self) -> None:
        self.sampler.close()
