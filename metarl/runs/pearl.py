"""PEARL's experiment: a fixed set of training tasks, their replay buffers, collection, SAC updates.

One meta-iteration, top to bottom (:meth:`PEARLExperiment.train_iteration`)::

    iteration 0: every training task, initial_steps env steps with z ~ prior    -> both buffers
    tasks = tasks_per_iteration training tasks                   # split_rng(seed, TRAIN, i)
    for each task: clear its context buffer, then three phases, one episode per task per round,
        all the iteration's tasks side by side in the sampler (in-process or Ray workers):
        prior_steps      z ~ N(0, I), resampled every episode                   -> both buffers
        posterior_steps  z ~ q(z | c), c drawn from the task's context buffer   -> both buffers
        extra_rl_steps   the same                                               -> RL buffer only
        (each phase's first episode uses the prior, later ones the posterior after the episodes before)
    learner.step(ReplayBatch): gradient_steps updates of the encoder and SAC

The actor over ``[s, z]`` is sampled as an actor over ``s`` with each task's ``z`` folded into its
first layer (:func:`agents.pearl.actor_params_for_tasks`), so the lab's samplers run it unchanged.
Evaluation (:meth:`PEARLExperiment.curve`): on each held-out task, episode 1 with ``z`` from the
prior, episode ``k + 1`` with ``z`` drawn from the posterior of the ``k`` episodes before (all their
transitions): the return after 0, 1, 2, ... episodes of context.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from agents.pearl import PEARLAgent, actor_params_for_tasks, context_of
from agents.policies import TanhGaussianMLPPolicy
from metarl.core.learner import build_learner
from metarl.rl.episodes import Episodes
from metarl.rl.replay import ReplayBatch, TaskReplayBuffers
from metarl.rl.sampling.vector import task_seeds
from metarl.runs.experiment import TEST, TRAIN, VAL, Experiment, split_rng
from metarl.runs.rl import RLExperiment, make_task_env
from metarl.runs.rl_config import RLConfig

#: Seed keys of the collection phases (``task_seeds(seed, TRAIN, iteration, PHASE, round)``).
INITIAL, PRIOR, POSTERIOR, EXTRA = 0, 1, 2, 3


class PEARLExperiment(RLExperiment):
    """A PEARL run: the task envs and samplers of :class:`RLExperiment`, PEARL's agent, buffers and loop."""

    def __init__(self, cfg: RLConfig) -> None:
        Experiment.__init__(self, cfg)
        p = cfg.pearl
        self.task_envs = {TRAIN: make_task_env(cfg), VAL: make_task_env(cfg), TEST: make_task_env(cfg, test=True)}
        probe = self.task_envs[TRAIN]
        obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        torch.manual_seed(cfg.seed)
        self.agent = PEARLAgent(
            obs_dim,
            act_dim,
            latent_dim=p.latent_dim,
            hidden=p.hidden,
            encoder_hidden=p.encoder_hidden,
            next_obs_in_context=p.next_obs_in_context,
        ).to(self.device)
        self.model = self.agent
        self.trials = False
        self.obs_dim = obs_dim
        #: the sampler's actor: structure only (parameters, z folded in, travel per call)
        self.rollout_policy = TanhGaussianMLPPolicy(obs_dim, act_dim, hidden=p.hidden)
        self.learner = build_learner("rl", cfg, self.agent, None)
        self.train_tasks = self.sample_tasks(TRAIN, 0, p.train_tasks)
        self.rl_buffers = TaskReplayBuffers(p.train_tasks, p.buffer_capacity, obs_dim, act_dim)
        self.context_buffers = TaskReplayBuffers(p.train_tasks, p.buffer_capacity, obs_dim, act_dim)
        self.events: list[dict[str, Any]] = []
        self.env_steps = 0
        self.monitoring_steps = 0
        self._samplers: dict[tuple, Any] = {}

    # -- acting ------------------------------------------------------------------------------
    def latents(self, contexts: torch.Tensor | list[torch.Tensor | None], generator: torch.Generator) -> torch.Tensor:
        """``z [N, L]``: a draw from each task's posterior given its context.

        ``contexts``: one batch ``[N, C, context_dim]`` (one encoder call for all tasks), or a list
        of per-task contexts ``[C_n, context_dim]`` of any lengths (None: the prior).
        """
        noise = torch.randn(len(contexts), self.agent.latent_dim, generator=generator)
        with torch.no_grad():
            if isinstance(contexts, torch.Tensor):
                mu, var = self.agent.posterior(contexts.to(self.device))
                return mu.cpu() + var.sqrt().cpu() * noise
            rows = []
            for context, eps in zip(contexts, noise):
                if context is None or len(context) == 0:
                    rows.append(eps)
                    continue
                mu, var = self.agent.posterior(context.to(self.device)[None])
                rows.append(mu[0].cpu() + var[0].sqrt().cpu() * eps)
        return torch.stack(rows)

    def sample_with(self, tasks: list[dict], z: torch.Tensor, seeds: np.ndarray, *, test: bool = False) -> Episodes:
        """One episode of each task, acting with the actor at that task's ``z``."""
        actor = {k: v.detach().cpu() for k, v in self.agent.actor.params().items()}
        params = actor_params_for_tasks(actor, z, self.obs_dim)
        return self.sampler(test=test, episodes=1).sample(params, tasks, seeds, per_task=True)

    def episode_context(self, episodes: Episodes, n: int) -> torch.Tensor:
        """Task ``n``'s transitions of ``episodes`` as context rows ``[steps, context_dim]``."""
        one = episodes.task(n)
        rows = []
        for e, length in enumerate(one.lengths[0].tolist()):
            obs = one.observations[0, :length, e]
            nxt = torch.cat([obs[1:], one.final_observations[0, e][None]])
            next_obs = nxt if self.agent.next_obs_in_context else None
            rows.append(context_of(obs, one.actions[0, :length, e], one.rewards[0, :length, e], next_obs))
        return torch.cat(rows)

    # -- collection --------------------------------------------------------------------------
    def collect(
        self, indices: list[int], steps: int, keys: tuple[int, ...], *, prior_only: bool, context: bool
    ) -> dict:
        """``steps`` env steps (whole episodes) for each training task of ``indices``; randomness from
        ``split_rng(seed, TRAIN, *keys)`` and ``task_seeds(seed, TRAIN, *keys, round)``.

        The first episode acts with ``z`` from the prior; unless ``prior_only``, later ones with
        ``z`` from the posterior of a context drawn from the task's context buffer (refreshed after
        every episode). Adds to the RL buffers, and to the context buffers when ``context``.
        """
        if steps == 0 or not indices:
            return {"steps": 0, "returns": []}
        tasks = [self.train_tasks[i] for i in indices]
        rounds = math.ceil(steps / self.horizon)
        rng = split_rng(self.cfg.seed, TRAIN, *keys)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        collected, returns = 0, []
        for r in range(rounds):
            if r == 0 or prior_only:
                contexts: torch.Tensor | list[None] = [None] * len(indices)
            else:  # the same context size for every task: one encoder call
                contexts = self.agent.context(self.context_buffers.sample(indices, self.cfg.pearl.context_size, rng))
            z = self.latents(contexts, generator)
            episodes = self.sample_with(tasks, z, task_seeds(self.cfg.seed, TRAIN, *keys, r, n=len(tasks)))
            collected += self.rl_buffers.add_episodes(indices, episodes)
            if context:
                self.context_buffers.add_episodes(indices, episodes)
            returns.append(episodes.returns_per_episode()[:, 0])
        return {"steps": collected, "returns": torch.stack(returns, 1)}

    @property
    def horizon(self) -> int:
        return self.sampler(episodes=1).horizon

    # -- state -------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"env_steps": self.env_steps}
        if self.cfg.pearl.checkpoint_buffers:
            state["replay"] = {"rl": self.rl_buffers.state_dict(), "context": self.context_buffers.state_dict()}
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
        replay = state.get("replay")
        if replay is not None:
            self.rl_buffers.load_state_dict(replay["rl"])
            self.context_buffers.load_state_dict(replay["context"])

    # -- training ----------------------------------------------------------------------------
    def train_iteration(self, it: int) -> dict[str, Any]:
        cfg, p = self.cfg, self.cfg.pearl
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        steps = 0
        if int(self.rl_buffers.sizes.sum()) == 0:  # the first iteration (or a resume without buffers)
            everything = list(range(p.train_tasks))
            for lo in range(0, p.train_tasks, cfg.meta_batch_size):
                chunk = everything[lo : lo + cfg.meta_batch_size]
                steps += self.collect(chunk, p.initial_steps, (it, INITIAL, lo), prior_only=True, context=True)["steps"]
        rng = split_rng(cfg.seed, TRAIN, it)
        indices = sorted(rng.choice(p.train_tasks, p.tasks_per_iteration, replace=False).tolist())
        for i in indices:
            self.context_buffers.clear(i)
        prior = self.collect(indices, p.prior_steps, (it, PRIOR), prior_only=True, context=True)
        posterior = self.collect(indices, p.posterior_steps, (it, POSTERIOR), prior_only=False, context=True)
        extra = self.collect(indices, p.extra_rl_steps, (it, EXTRA), prior_only=False, context=False)
        steps += prior["steps"] + posterior["steps"] + extra["steps"]
        self.env_steps += steps
        t1 = time.perf_counter()
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        update = self.learner.step(ReplayBatch(self.rl_buffers, self.context_buffers, rng, generator), it)
        t2 = time.perf_counter()
        if prior["steps"]:
            row["return/prior"] = float(prior["returns"].mean())
        posterior_returns = [
            x["returns"][:, 1:] for x in (posterior, extra) if len(x["returns"]) and x["returns"].shape[1] > 1
        ]
        if posterior_returns:
            row["return/posterior"] = float(torch.cat(posterior_returns, 1).mean())
        row["return/pre_adapt"] = row.get("return/prior", float("nan"))
        row["return/post_adapt"] = row.get("return/posterior", float("nan"))
        row.update(update)
        row["env_steps"] = self.env_steps
        row["env_steps_per_s"] = steps / max(t1 - t0, 1e-9)
        row["time/sampling"] = t1 - t0
        row["time/meta_update"] = t2 - t1
        row["replay/bytes"] = self.rl_buffers.nbytes() + self.context_buffers.nbytes()
        return row

    def progress_text(self, row: dict[str, Any]) -> str:
        return f"return prior {row['return/pre_adapt']:.1f} posterior {row['return/post_adapt']:.1f}"

    def validate(self) -> dict[str, float]:
        mean = self.curve(VAL, 0, self.cfg.eval.val_tasks, steps=self.cfg.eval.steps).mean(0)
        return {"val/return_pre_adapt": float(mean[0]), "val/return_post_adapt": float(mean[-1])}

    # -- adaptation and evaluation ----------------------------------------------------------
    @property
    def policy(self) -> TanhGaussianMLPPolicy:
        """The actor at the prior's mean ``z = 0``, as a policy over observations (the meta-policy
        before any context; :func:`metarl.load`)."""
        return self.policy_at(torch.zeros(self.agent.latent_dim))

    def policy_at(self, z: torch.Tensor) -> TanhGaussianMLPPolicy:
        """The actor at one ``z [L]`` as a :class:`TanhGaussianMLPPolicy` over observations."""
        actor = {k: v.detach().cpu() for k, v in self.agent.actor.params().items()}
        params = actor_params_for_tasks(actor, z.view(1, -1).cpu(), self.obs_dim)
        policy = TanhGaussianMLPPolicy(self.obs_dim, self.agent.act_dim, hidden=self.cfg.pearl.hidden)
        policy.load_state_dict({k: v[0] for k, v in params.items()})
        return policy

    def posterior_mean(self, context: torch.Tensor | None) -> torch.Tensor:
        """The mean of ``q(z | context)`` (``[C, context_dim]``; None: the prior's, 0): ``[L]``."""
        if context is None or len(context) == 0:
            return torch.zeros(self.agent.latent_dim)
        with torch.no_grad():
            return self.agent.posterior(context.to(self.device)[None])[0][0].cpu()

    def infer(
        self, tasks: list[dict], episodes: int, keys: tuple[int, ...], *, test: bool
    ) -> tuple[np.ndarray, list[torch.Tensor | None]]:
        """``episodes`` episodes of each task, one after the other: episode 1 with ``z`` from the
        prior, episode ``k + 1`` with ``z`` drawn from the posterior of every transition of the ``k``
        before. Returns each episode's return ``[N, episodes]`` and each task's context (all of them)."""
        split = keys[0]
        rng = split_rng(self.cfg.seed, *keys)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        contexts: list[torch.Tensor | None] = [None] * len(tasks)
        columns = []
        for k in range(episodes):
            z = self.latents(contexts, generator)
            seeds = task_seeds(self.cfg.seed, split, *keys[1:], k, n=len(tasks))
            data = self.sample_with(tasks, z, seeds, test=test)
            columns.append(data.returns_per_episode()[:, 0].numpy())
            for n in range(len(tasks)):
                new = self.episode_context(data, n)
                contexts[n] = new if contexts[n] is None else torch.cat([contexts[n], new])
        return np.stack(columns, 1), contexts

    def curve(self, split: int, key: int, num_tasks: int, *, steps: int) -> np.ndarray:
        """Return of episode ``k + 1`` of each task after ``k = 0..steps`` episodes of context
        (:meth:`infer`): ``[num_tasks, steps + 1]``."""
        tasks = self.sample_tasks(split, key, num_tasks)
        return self.infer(tasks, steps + 1, (split, key), test=split == TEST)[0]
