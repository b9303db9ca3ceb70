"""The meta-RL family: envs, sampler, policy and objective of a config; sampling a meta-iteration.

One meta-iteration, top to bottom (:meth:`RLExperiment.train_iteration`)::

    tasks  = task distribution.sample_tasks(meta_batch_size)           # split_rng(seed, TRAIN, i)
    train  = [episodes of theta] + [episodes of phi_s for s < steps]   # sampler: in-process or Ray
    phi    = learner.adapt(theta, train)                               # per task, batched
    valid  = episodes of phi
    theta  = learner.step(RLBatch(train, valid, phi), i)               # TRPO / Adam / Reptile
    log returns before and after each step, losses, KL, timings

The episodes of inner step ``s`` (``s = steps``: validation) come from
``task_seeds(seed, TRAIN, i, s)``, so the episodes do not depend on the number of Ray workers.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import agents  # noqa: F401  (registers the algorithms)
import envs  # noqa: F401  (registers the families)
from agents.policies import make_policy
from metarl.core.functional import Params, inner_lrs
from metarl.core.learner import build_learner
from metarl.rl.advantages import compute_advantages
from metarl.rl.episodes import Episodes
from metarl.rl.objective import PolicyGradientObjective, RLBatch, StepData
from metarl.rl.sampling.vector import VectorSampler, task_seeds
from metarl.rl.value_baselines import LinearFeatureBaseline
from metarl.runs.experiment import TEST, TRAIN, VAL, Experiment, split_rng
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import RunError


def make_task_env(cfg: RLConfig, *, test: bool = False) -> gym.Env:
    """An env of the family (unwrapped) for sampling tasks; ``test``: the held-out split's."""
    kwargs = cfg.env_kwargs(test=test)
    try:
        return gym.make(cfg.env_id, **kwargs).unwrapped
    except TypeError as exc:
        raise RunError(f"env: {cfg.env_id} does not accept these arguments {kwargs}: {exc}") from None


class RLExperiment(Experiment):
    """A meta-RL run: task envs, policy, value baseline, samplers and learner."""

    metric = "return"

    def __init__(self, cfg: RLConfig) -> None:
        super().__init__(cfg)
        self.task_envs = {TRAIN: make_task_env(cfg), VAL: make_task_env(cfg), TEST: make_task_env(cfg, test=True)}
        probe = self.task_envs[TRAIN]
        torch.manual_seed(cfg.seed)
        p = cfg.policy
        self.policy = make_policy(
            probe.observation_space,
            probe.action_space,
            hidden=p.hidden,
            activation=p.activation,
            init_std=p.init_std,
            recurrent=p.recurrent,
            rnn_size=p.rnn_size,
        ).to(self.device)
        #: RL^2: the learner adapts by running trials of ``episodes_per_trial`` episodes, not by gradient
        self.trials = p.recurrent is not None
        self.model = self.policy
        self.rollout_policy = copy.deepcopy(self.policy).cpu()  # structure only: parameters travel per call
        self.objective = PolicyGradientObjective(self.policy)
        self.learner = build_learner("rl", cfg, self.policy, self.objective)
        self.baseline = LinearFeatureBaseline()
        self.events: list[dict[str, Any]] = []
        self.env_steps = 0  # the steps the learner learns from (training cost)
        self.monitoring_steps = 0  # sampled only for the log (Reptile's post-adaptation episodes)
        self._samplers: dict[tuple, Any] = {}

    # -- sampling ----------------------------------------------------------------------------
    def sampler(self, test: bool = False, episodes: int | None = None, episodes_per_trial: int | None = None):
        """The sampler (in-process, or Ray workers when ``ray.workers > 0``) of a split and size
        (``episodes`` per task, in trials of ``episodes_per_trial`` for RL^2)."""
        cfg = self.cfg
        env_kwargs = cfg.env_kwargs(test=test)
        e = episodes or cfg.episodes_per_task
        k = episodes_per_trial or cfg.episodes_per_trial
        key = (tuple(sorted(env_kwargs.items())), e, k)
        if key not in self._samplers:
            if cfg.ray.workers > 0:
                from metarl.rl.sampling.ray_sampler import RaySampler

                self._samplers[key] = RaySampler(
                    cfg.env_id,
                    policy=self.rollout_policy,
                    episodes_per_task=e,
                    num_workers=cfg.ray.workers,
                    horizon=cfg.horizon,
                    env_kwargs=env_kwargs,
                    action_scale=cfg.action_scale,
                    batch_physics=cfg.sampler.batch_physics,
                    physics_threads=cfg.sampler.physics_threads,
                    episodes_per_trial=k,
                    address=cfg.ray.address,
                    on_event=self._on_event,
                )
            else:
                self._samplers[key] = VectorSampler(
                    cfg.env_id,
                    episodes_per_task=e,
                    horizon=cfg.horizon,
                    env_kwargs=env_kwargs,
                    action_scale=cfg.action_scale,
                    batch_physics=cfg.sampler.batch_physics,
                    physics_threads=cfg.sampler.physics_threads,
                    episodes_per_trial=k,
                ).bind(self.rollout_policy)
        return self._samplers[key]

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        print(
            f"metarl: {event['event']}: worker {event['worker']} ({event['error']}); tasks "
            f"{event['tasks'][0]}..{event['tasks'][1] - 1} re-sampled",
            file=sys.stderr,
        )

    def _step_data(self, episodes: Episodes) -> StepData:
        cfg = self.cfg
        advantages = compute_advantages(
            episodes,
            self.baseline,
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
            normalize=cfg.normalize_advantages,
            bootstrap_truncated=cfg.bootstrap_truncated,
        )
        return StepData(episodes, advantages, cfg.loss_average).to(self.device)

    def sample_tasks(self, split: int, key: int, n: int) -> list[dict[str, Any]]:
        env = self.task_envs[split]
        env.np_random = split_rng(self.cfg.seed, split, key)
        return env.sample_tasks(n)

    def adapt_and_sample(
        self,
        tasks: Sequence[dict[str, Any]],
        seed_keys: tuple[int, ...],
        steps: int,
        *,
        sampler=None,
        lrs: list[float] | None = None,
    ) -> tuple[RLBatch, dict[str, float]]:
        """Episodes of ``theta`` and after each of ``steps`` inner steps, as an :class:`RLBatch`
        (``adapted``: the parameters that sampled ``valid``), and the sampling/adaptation times.

        The episodes of step ``s`` use ``task_seeds(seed, *seed_keys, s)``; ``lrs``: inner learning
        rates (default the learner's).
        """
        sampler = sampler or self.sampler()
        theta = self.learner.theta()
        times = {"sampling": 0.0, "adaptation": 0.0}
        train: list[StepData] = []
        params: Params = theta
        per_task = False
        for s in range(steps + 1):
            t0 = time.perf_counter()
            seeds = task_seeds(self.cfg.seed, *seed_keys, s, n=len(tasks))
            cpu = {k: v.detach().cpu() for k, v in params.items()}
            data = self._step_data(sampler.sample(cpu, tasks, seeds, per_task=per_task))
            t1 = time.perf_counter()
            times["sampling"] += t1 - t0
            if s == steps:
                return RLBatch(train, data, params), times
            train.append(data)
            with torch.no_grad():
                params = self.learner.adapt(theta, train, lrs=lrs, first_order=True)
            per_task = True
            times["adaptation"] += time.perf_counter() - t1
        raise AssertionError("unreachable")

    # -- state -------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps, "monitoring_steps": self.monitoring_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
        self.monitoring_steps = int(state.get("monitoring_steps", 0))

    # -- training ----------------------------------------------------------------------------
    def train_iteration(self, it: int) -> dict[str, Any]:
        cfg = self.cfg
        tasks = self.sample_tasks(TRAIN, it, cfg.meta_batch_size)
        batch, times = self.adapt_and_sample(tasks, (TRAIN, it), 0 if self.trials else cfg.inner.steps)
        t1 = time.perf_counter()
        update = self.learner.step(batch, it)
        t2 = time.perf_counter()
        train, valid = batch.train, batch.valid
        learned_from = sum(d.episodes.num_steps() for d in train)
        monitoring = 0
        if self.learner.uses_query:
            learned_from += valid.episodes.num_steps()
        else:  # Reptile: the post-adaptation episodes are sampled only for the log
            monitoring = valid.episodes.num_steps()
        steps = learned_from + monitoring
        self.env_steps += learned_from
        self.monitoring_steps += monitoring
        row: dict[str, Any] = {}
        if self.trials:  # RL^2: the return of each episode of the trials, in order
            returns = list(self.per_trial_episode(valid.episodes.returns_per_episode()).unbind(1))
        else:
            returns = [d.episodes.returns_per_episode().mean(1) for d in [*train, valid]]
        row["return/pre_adapt"] = float(returns[0].mean())
        row["return/post_adapt"] = float(returns[-1].mean())
        row["return/pre_adapt_std"] = float(returns[0].std()) if len(tasks) > 1 else 0.0
        row["return/post_adapt_std"] = float(returns[-1].std()) if len(tasks) > 1 else 0.0
        for s, r in enumerate(returns[1:], start=1):
            row[f"return/post_adapt_step{s}"] = float(r.mean())
        if valid.episodes.success is not None:  # Meta-World
            if self.trials:
                success = self.per_trial_episode(valid.episodes.success)
                row["success/pre_adapt"], row["success/post_adapt"] = (
                    float(success[:, 0].mean()),
                    float(success[:, -1].mean()),
                )
            else:
                row["success/pre_adapt"] = float(train[0].episodes.success.mean())
                row["success/post_adapt"] = float(valid.episodes.success.mean())
        row.update(update)
        row["env_steps"] = self.env_steps
        if not self.learner.uses_query:
            row["env_steps_monitoring"] = self.monitoring_steps
        row["env_steps_per_s"] = steps / max(times["sampling"], 1e-9)
        row["time/sampling"] = times["sampling"]
        row["time/adaptation"] = times["adaptation"]
        row["time/meta_update"] = t2 - t1
        return row

    def per_trial_episode(self, values: torch.Tensor, episodes_per_trial: int | None = None) -> torch.Tensor:
        """RL^2: per-episode values ``[N, E]`` (episode ``r * K + k`` is episode ``k`` of trial ``r``)
        as each task's mean over its trials of episode ``k``: ``[N, K]``."""
        k = episodes_per_trial or self.cfg.episodes_per_trial
        n, e = values.shape
        return values.reshape(n, e // k, k).mean(1)

    def run_metrics(self) -> dict[str, Any]:
        return {"sampler/worker_replacements": len(self.events)} if self.events else {}

    def progress_text(self, row: dict[str, Any]) -> str:
        return f"return pre {row['return/pre_adapt']:.1f} post {row['return/post_adapt']:.1f}"

    def validate(self) -> dict[str, float]:
        steps = self.cfg.episodes_per_trial - 1 if self.trials else self.cfg.inner.steps
        curve = self.curve(VAL, 0, self.cfg.eval.val_tasks, steps=steps)
        mean = curve.mean(0)
        return {"val/return_pre_adapt": float(mean[0]), "val/return_post_adapt": float(mean[-1])}

    # -- evaluation --------------------------------------------------------------------------
    def curve(self, split: int, key: int, num_tasks: int, *, steps: int) -> np.ndarray:
        """Mean episode return of each task after 0..steps inner steps: ``[num_tasks, steps + 1]``.

        RL^2: after 0..steps episodes of experience, i.e. the return of episodes 1..steps+1 of
        trials of ``steps + 1`` episodes (as many trials per task as in training)."""
        cfg = self.cfg
        if self.trials:
            return self._trial_curve(split, key, num_tasks, steps=steps)
        lrs = inner_lrs(cfg.inner.lr, steps)
        sampler = self.sampler(test=split == TEST, episodes=cfg.eval.episodes_per_task)
        rows = []
        tasks = self.sample_tasks(split, key, num_tasks)
        for lo in range(0, num_tasks, cfg.meta_batch_size):
            chunk = tasks[lo : lo + cfg.meta_batch_size]
            batch, _ = self.adapt_and_sample(chunk, (split, key, lo), steps, sampler=sampler, lrs=lrs)
            per_step = [d.episodes.returns_per_episode().mean(1) for d in [*batch.train, batch.valid]]
            rows.append(torch.stack(per_step, dim=1).cpu().numpy())
        return np.concatenate(rows)

    def _trial_curve(self, split: int, key: int, num_tasks: int, *, steps: int) -> np.ndarray:
        cfg = self.cfg
        k = steps + 1
        trials = cfg.episodes_per_task // cfg.episodes_per_trial
        sampler = self.sampler(test=split == TEST, episodes=trials * k, episodes_per_trial=k)
        tasks = self.sample_tasks(split, key, num_tasks)
        theta = {name: v.detach().cpu() for name, v in self.learner.theta().items()}
        rows = []
        for lo in range(0, num_tasks, cfg.meta_batch_size):
            chunk = tasks[lo : lo + cfg.meta_batch_size]
            episodes = sampler.sample(theta, chunk, task_seeds(cfg.seed, split, key, lo, 0, n=len(chunk)))
            rows.append(self.per_trial_episode(episodes.returns_per_episode(), k).numpy())
        return np.concatenate(rows)

    def evaluation_curve(self, num_tasks: int, steps: int, seed: int) -> np.ndarray:
        return self.curve(TEST, seed, num_tasks, steps=steps)

    def close(self) -> None:
        for sampler in self._samplers.values():
            sampler.close()
