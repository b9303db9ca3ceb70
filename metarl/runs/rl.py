"""A meta-RL experiment: envs, sampler, policy and meta-learner from a config; train and evaluate.

One meta-iteration, top to bottom (:meth:`RLExperiment.train`)::

    tasks  = task distribution.sample_tasks(meta_batch_size)           # seeded by (seed, iteration)
    train  = [episodes of theta] + [episodes of phi_s for s < steps]   # sampler: in-process or Ray
    phi    = inner loop on train (per task, batched)
    valid  = episodes of phi
    theta  = meta-learner.step(train, valid)                           # TRPO / Adam / Reptile
    log returns before and after each step, losses, KL, timings; checkpoint

Seeding: the policy is initialised from ``seed``; the tasks of iteration ``i`` come from the
family's ``sample_tasks`` with ``np_random = default_rng([seed, TRAIN, i])``; the episodes of
inner step ``s`` (``s = steps``: validation) from ``task_seeds(seed, TRAIN, i, s)``. Nothing
else is random, so a resumed run reaches exactly the result of an uninterrupted one, with any
number of Ray workers.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import envs  # noqa: F401  (registers the families)
from agents.learners import FOMAMLAdam, MAMLTRPO, ReptilePolicy, StepData
from agents.policies import make_policy
from metarl.rl.value_baselines import LinearFeatureBaseline
from metarl.rl.episodes import Episodes, compute_advantages
from metarl.core.functional import inner_lrs
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import (CHECKPOINT, MetricsLogger, RunError, StopRequest, resolve_device, restore_checkpoint,
                        save_checkpoint)
from metarl.rl.sampling import RaySampler, VectorSampler, task_seeds

TRAIN, VAL, TEST = 0, 1, 2


def mean_and_ci95(values: np.ndarray) -> dict[str, Any]:
    """Per-column mean and 95% CI half-width (1.96 standard errors) over the rows (tasks)."""
    mean = values.mean(0)
    ci95 = 1.96 * values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    return {"mean": [float(x) for x in mean], "ci95": [float(x) for x in ci95], "num_tasks": int(len(values))}


def build_learner(cfg: RLConfig, policy: torch.nn.Module):
    lrs = inner_lrs(cfg.inner.lr, cfg.inner.steps)
    if cfg.algorithm == "reptile":
        return ReptilePolicy(policy, inner_lrs=lrs, epsilon_start=cfg.outer.epsilon_start,
                             epsilon_end=cfg.outer.epsilon_end, num_iterations=cfg.num_iterations)
    if cfg.algorithm == "fomaml" and cfg.outer.optimizer == "adam":
        return FOMAMLAdam(policy, inner_lrs=lrs, lr=cfg.outer.lr)
    t = cfg.outer.trpo
    return MAMLTRPO(policy, inner_lrs=lrs, first_order=cfg.algorithm == "fomaml", max_kl=t.max_kl,
                    cg_iterations=t.cg_iterations, cg_damping=t.cg_damping, line_search_steps=t.line_search_steps,
                    line_search_ratio=t.line_search_ratio, fvp_subsample=t.fvp_subsample)


def _make_env(cfg: RLConfig, *, test: bool = False) -> gym.Env:
    kwargs = cfg.env_kwargs(test=test)
    try:
        return gym.make(cfg.env_id, **kwargs).unwrapped
    except TypeError as exc:
        raise RunError(f"env: {cfg.env_id} does not accept these arguments {kwargs}: {exc}") from None


class RLExperiment:
    """Everything a meta-RL run needs, built from its config."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.task_envs = {TRAIN: _make_env(cfg), VAL: _make_env(cfg), TEST: _make_env(cfg, test=True)}
        probe = self.task_envs[TRAIN]
        torch.manual_seed(cfg.seed)
        p = cfg.policy
        self.policy = make_policy(probe.observation_space, probe.action_space, hidden=p.hidden,
                                  activation=p.activation, init_std=p.init_std).to(self.device)
        self.rollout_policy = copy.deepcopy(self.policy).cpu()  # structure only: parameters travel per call
        self.learner = build_learner(cfg, self.policy)
        self.baseline = LinearFeatureBaseline()
        self.events: list[dict[str, Any]] = []
        self.env_steps = 0
        self._samplers: dict[tuple, Any] = {}

    # -- sampling ----------------------------------------------------------------------------
    def sampler(self, test: bool = False, episodes: int | None = None):
        cfg = self.cfg
        env_kwargs = cfg.env_kwargs(test=test)
        e = episodes or cfg.episodes_per_task
        key = (tuple(sorted(env_kwargs.items())), e)
        if key not in self._samplers:
            if cfg.ray.workers > 0:
                self._samplers[key] = RaySampler(cfg.env_id, policy=self.rollout_policy, episodes_per_task=e,
                                                 num_workers=cfg.ray.workers, horizon=cfg.horizon,
                                                 env_kwargs=env_kwargs, address=cfg.ray.address,
                                                 on_event=self._on_event)
            else:
                self._samplers[key] = VectorSampler(cfg.env_id, episodes_per_task=e, horizon=cfg.horizon,
                                                    env_kwargs=env_kwargs)
        return self._samplers[key]

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        print(f"metarl: {event['event']}: worker {event['worker']} ({event['error']}); tasks "
              f"{event['tasks'][0]}..{event['tasks'][1] - 1} re-sampled", file=sys.stderr)

    def _sample(self, sampler, params, tasks, seeds, per_task: bool) -> Episodes:
        cpu = {k: v.detach().cpu() for k, v in params.items()}
        if isinstance(sampler, RaySampler):
            episodes = sampler.sample(cpu, tasks, seeds, per_task=per_task)
        else:
            episodes = sampler.sample(self.rollout_policy, cpu, tasks, seeds, per_task=per_task)
        return episodes

    def _step_data(self, episodes: Episodes) -> StepData:
        cfg = self.cfg
        advantages = compute_advantages(episodes, self.baseline, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
                                        normalize=cfg.normalize_advantages)
        return StepData(episodes, advantages).to(self.device)

    def sample_tasks(self, split: int, key: int, n: int) -> list[dict[str, Any]]:
        env = self.task_envs[split]
        env.np_random = np.random.default_rng([self.cfg.seed, split, key])
        return env.sample_tasks(n)

    def adapt_and_sample(self, tasks, seed_keys: tuple[int, ...], steps: int, *, sampler=None,
                         lrs: list[float] | None = None) -> tuple[list[StepData], StepData, dict]:
        """Episodes of ``theta`` and after each of ``steps`` inner steps; returns (train, valid, times).

        The episodes of step ``s`` use ``task_seeds(seed, *seed_keys, s)``; ``lrs``: inner learning
        rates (default the learner's); ``self.last_adapted`` keeps the parameters of the last step.
        """
        cfg, inner = self.cfg, self.learner.inner
        sampler = sampler or self.sampler()
        theta = {k: v.detach() for k, v in self.policy.named_parameters()}
        times = {"sampling": 0.0, "adaptation": 0.0}
        train: list[StepData] = []
        params, per_task = theta, False
        for s in range(steps + 1):
            t0 = time.perf_counter()
            seeds = task_seeds(cfg.seed, *seed_keys, s, n=len(tasks))
            data = self._step_data(self._sample(sampler, params, tasks, seeds, per_task))
            t1 = time.perf_counter()
            times["sampling"] += t1 - t0
            if s == steps:
                self.last_adapted = params  # the parameters that sampled `data`
                return train, data, times
            train.append(data)
            with torch.no_grad():
                params = inner.adapt(theta, train, first_order=True, lrs=lrs)
            per_task = True
            times["adaptation"] += time.perf_counter() - t1
        raise AssertionError("unreachable")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "model": self.policy.state_dict(), "learner": self.learner.state_dict(),
                "env_steps": self.env_steps}

    def load_checkpoint(self, path: Path) -> int:
        """Load the checkpoint at ``path``; returns its iteration. Any mismatch is a one-line RunError."""

        def apply(state: dict[str, Any]) -> None:
            self.policy.load_state_dict(state["model"])
            self.learner.load_state_dict(state.get("learner", {}))

        state = restore_checkpoint(path, apply, map_location=self.device)
        self.env_steps = int(state.get("env_steps", 0))
        return int(state["iteration"])

    # -- training ----------------------------------------------------------------------------
    def train_iteration(self, it: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        tasks = self.sample_tasks(TRAIN, it, cfg.meta_batch_size)
        train, valid, times = self.adapt_and_sample(tasks, (TRAIN, it), cfg.inner.steps)
        t1 = time.perf_counter()
        if isinstance(self.learner, ReptilePolicy):
            update = self.learner.step(train, it)
        elif isinstance(self.learner, MAMLTRPO):
            update = self.learner.step(train, valid, adapted=self.last_adapted)
        else:
            update = self.learner.step(train, valid)
        t2 = time.perf_counter()
        steps = sum(d.episodes.num_steps() for d in train) + valid.episodes.num_steps()
        self.env_steps += steps
        row: dict[str, Any] = {"iteration": it}
        returns = [d.episodes.returns_per_episode().mean(1) for d in train] + [valid.episodes.returns_per_episode().mean(1)]
        row["return/pre_adapt"] = float(returns[0].mean())
        row["return/post_adapt"] = float(returns[-1].mean())
        row["return/pre_adapt_std"] = float(returns[0].std()) if len(tasks) > 1 else 0.0
        row["return/post_adapt_std"] = float(returns[-1].std()) if len(tasks) > 1 else 0.0
        for s, r in enumerate(returns[1:], start=1):
            row[f"return/post_adapt_step{s}"] = float(r.mean())
        if valid.episodes.success is not None:  # Meta-World
            row["success/pre_adapt"] = float(train[0].episodes.success.mean())
            row["success/post_adapt"] = float(valid.episodes.success.mean())
        row.update(update)
        row["env_steps"] = self.env_steps
        row["env_steps_per_s"] = steps / max(times["sampling"], 1e-9)
        row["time/sampling"] = times["sampling"]
        row["time/adaptation"] = times["adaptation"]
        row["time/meta_update"] = t2 - t1
        row["time/iteration"] = time.perf_counter() - t0
        return row

    def validate(self) -> dict[str, float]:
        curve = self.curve(VAL, 0, self.cfg.eval.val_tasks, steps=self.cfg.inner.steps)
        mean = curve.mean(0)
        return {"val/return_pre_adapt": float(mean[0]), "val/return_post_adapt": float(mean[-1])}

    def train(self, run_dir: Path, *, start: int = 0, progress: bool = True) -> None:
        cfg = self.cfg
        logger = MetricsLogger(run_dir, start=start)
        bar = tqdm(total=cfg.num_iterations, initial=start, disable=not progress, desc=f"{cfg.family}/{cfg.algorithm}", unit="it")
        try:
            for it in range(start, cfg.num_iterations):
                StopRequest.check(save=(lambda: save_checkpoint(self.state_dict(it), run_dir / CHECKPOINT))
                                  if it > start else None)  # nothing new to keep before the first iteration
                row = self.train_iteration(it)
                if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or it + 1 == cfg.num_iterations):
                    row.update(self.validate())
                if self.events:
                    row["sampler/worker_replacements"] = len(self.events)
                if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.num_iterations:
                    save_checkpoint(self.state_dict(it + 1), run_dir / CHECKPOINT)
                logger.log(row)
                bar.update(1)
                bar.set_postfix_str(f"return pre {row['return/pre_adapt']:.1f} post {row['return/post_adapt']:.1f}",
                                    refresh=False)
        finally:
            bar.close()
            logger.close()

    # -- evaluation --------------------------------------------------------------------------
    def curve(self, split: int, key: int, num_tasks: int, *, steps: int) -> np.ndarray:
        """Mean episode return of each task after 0..steps inner steps: ``[num_tasks, steps + 1]``."""
        cfg = self.cfg
        lrs = inner_lrs(cfg.inner.lr, steps)
        sampler = self.sampler(test=split == TEST, episodes=cfg.eval.episodes_per_task)
        rows = []
        tasks = self.sample_tasks(split, key, num_tasks)
        for lo in range(0, num_tasks, cfg.meta_batch_size):
            chunk = tasks[lo:lo + cfg.meta_batch_size]
            train, valid, _ = self.adapt_and_sample(chunk, (split, key, lo), steps, sampler=sampler, lrs=lrs)
            per_step = [d.episodes.returns_per_episode().mean(1) for d in train + [valid]]
            rows.append(torch.stack(per_step, dim=1).cpu().numpy())
        return np.concatenate(rows)

    def evaluate(self, *, num_tasks: int, steps: int, seed: int) -> dict[str, Any]:
        """Return after 0..steps adaptation steps on ``num_tasks`` held-out tasks, mean and 95% CI."""
        summary = mean_and_ci95(self.curve(TEST, seed, num_tasks, steps=steps))
        return {"metric": "return", "steps": list(range(steps + 1)), **summary}

    def close(self) -> None:
        for sampler in self._samplers.values():
            sampler.close()


def restore(cfg: RLConfig, run_dir: Path) -> tuple[RLExperiment, int]:
    exp = RLExperiment(cfg)
    return exp, exp.load_checkpoint(run_dir / CHECKPOINT)
