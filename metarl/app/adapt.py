"""Adapt a meta-trained policy to a new task from a few episodes, from Python or the CLI.

    import metarl
    meta = metarl.load("runs/halfcheetah-vel")                # the meta-policy of a run
    adapted = meta.adapt({"velocity": 1.3}, episodes=20, steps=1)
    adapted.returns                                            # mean return before / after each step
    env = adapted.make_env()                                   # a plain gymnasium env on that task
    obs, _ = env.reset(seed=0)
    action = adapted.act(obs, deterministic=True)
    adapted.save("runs/halfcheetah-vel/adapted/v1.3")          # reload with metarl.load_adapted(...)

RL^2 runs (a recurrent policy) adapt by running a trial: ``episodes`` episodes of the task one after
the other, the policy's state carried across them; ``returns[i]`` is the mean return of episode
``i + 1`` (over the run's number of trials per task) and the adapted policy is the meta-policy
with the state of the first trial after its last episode (``steps`` and ``keep`` do not apply).
Acting then continues that trial: call ``act(obs)`` for each step and ``observe(reward, done)``
after it (the recurrent policy reads the previous reward; ``done`` marks the end of an episode).

PEARL runs adapt by inferring the task: ``episodes`` episodes of the task, the first with ``z`` drawn
from the prior, each later one with ``z`` drawn from the posterior of the transitions so far;
``returns[i]`` is the return of episode ``i + 1`` and the adapted policy is the actor at the
posterior mean after all of them (``steps`` and ``keep`` do not apply).

Otherwise adaptation is the run's own inner loop: ``episodes`` episodes of the current policy on the task,
the linear-baseline advantages, one policy-gradient step with the run's inner learning rate;
repeated ``steps`` times with fresh episodes, then a last batch of episodes measures the return
of the final policy. ``keep="best"`` keeps the step (0 = the meta-policy) with the highest
measured return instead of the last. A task outside the family's training range is allowed with
a warning; a malformed task raises :class:`envs.base.InvalidTask` naming the field.

An adapted-policy directory holds ``policy.pt`` (``{"model": {name: tensor}}``, loaded with
``weights_only=True``) and ``adapted.json`` (task, returns, kept step, and the run's path relative
to the directory, so a run moved with its ``adapted/`` folder still loads). Damaged or foreign
files raise a one-line :class:`~metarl.runs.rundir.RunError`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import envs  # noqa: F401
from envs.base import InvalidTask, TaskOutOfRange
from metarl.app.acting import Acting
from metarl.app.adapted_files import (
    ADAPTED_INFO,
    ADAPTED_POLICY,
    find_run,
    read_adapted_info,
    read_adapted_policy,
)
from metarl.app.video import VideoUnavailable, record_video
from metarl.core.atomic import atomic_open
from metarl.core.functional import inner_lrs
from metarl.rl.sampling import task_seeds
from metarl.rl.trials import trial_context
from metarl.runs.experiment import TEST, TRAIN
from metarl.runs.load import load_run_config, restore
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import RunError, require_run_dir, writing

KEEP = ("last", "best")
#: Seed key of the episodes of `metarl adapt` (test split): keeps them apart from evaluation's
#: episodes, whose keys are (TEST, seed, chunk offset).
ADAPT_SEED_KEY = 7


def _check_task(env_id: str, env_kwargs: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Validate ``task`` for the family; warn (not fail) when it is outside the training range."""
    env = gym.make(env_id, **env_kwargs).unwrapped
    try:
        env.set_task(task)
    except TaskOutOfRange as exc:
        warnings.warn(f"task outside the training range: {exc}; adapting anyway", stacklevel=3)
        env.set_task(task, allow_out_of_range=True)
    finally:
        env.close()
    return env.get_task()


class MetaPolicy(Acting):
    """The meta-trained policy of a run directory (see :func:`load`)."""

    def __init__(self, run_dir: Path, experiment) -> None:
        self.run_dir = run_dir
        self.experiment = experiment
        self.cfg = experiment.cfg
        self.policy = experiment.policy.cpu()
        self.params = {k: v.detach() for k, v in self.policy.named_parameters()}
        self.action_space = experiment.task_envs[0].action_space

    def metaworld_agent(self, *, seed: int = 0):
        """This meta-policy as Meta-World's ``MetaLearningAgent`` (``metaworld.evaluation``;
        :mod:`metarl.app.metaworld_agent`). Meta-World runs only."""
        from metarl.app.metaworld_agent import agent_of

        return agent_of(self, seed=seed)

    def task_by_index(self, index: int, *, test: bool = True) -> dict[str, Any]:
        """The ``index``-th task of a Meta-World split (test split by default)."""
        env = self.experiment.task_envs[TEST if test else TRAIN]
        if not hasattr(env, "all_tasks"):
            raise InvalidTask(
                f"--task-index needs a family with a fixed task list (Meta-World); {self.cfg.family} "
                "takes a task dict (--task)"
            )
        tasks = env.all_tasks()
        if not 0 <= index < len(tasks):
            raise InvalidTask(f"task index must be in [0, {len(tasks) - 1}] for this split, got {index}")
        return tasks[index]

    def adapt(
        self,
        task: dict[str, Any] | gym.Env,
        *,
        episodes: int = 20,
        steps: int = 1,
        seed: int = 0,
        test_split: bool = True,
        keep: str = "last",
    ) -> AdaptedPolicy:
        """Adapt to ``task`` (a task dict, or an env of the family whose current task is used).

        ``returns[s]`` is the mean return of ``episodes`` episodes after ``s`` steps (``steps + 1``
        values). ``keep="last"`` keeps the parameters after ``steps`` steps; ``keep="best"`` those of
        the step with the highest mean return (the first on ties; step 0 is the meta-policy).
        The kept step is ``AdaptedPolicy.kept_step``.
        """
        if isinstance(task, gym.Env):
            task = task.unwrapped.get_task()
        if episodes < 1 or steps < 0:
            raise ValueError(f"episodes must be >= 1 and steps >= 0, got episodes={episodes}, steps={steps}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        exp = self.experiment
        task = _check_task(self.cfg.env_id, self.cfg.env_kwargs(test=test_split), task)
        if exp.trials:
            return self._adapt_by_trial(task, episodes=episodes, seed=seed, test_split=test_split)
        if hasattr(exp, "infer"):
            return self._adapt_by_inference(task, episodes=episodes, seed=seed, test_split=test_split)
        sampler = exp.sampler(test=test_split, episodes=episodes)
        lrs = inner_lrs(self.cfg.inner.lr, steps)
        batch, _ = exp.adapt_and_sample([task], (TEST, ADAPT_SEED_KEY, seed), steps, sampler=sampler, lrs=lrs)
        train, final = batch.train, batch.valid
        returns = [_mean_return(d) for d in [*train, final]]
        kept = steps if keep == "last" else _best_step(returns)
        if kept == steps:
            phi = batch.adapted  # the parameters that sampled `final`
        else:  # the same inner steps as adapt_and_sample took, on the episodes of the first `kept` steps
            with torch.no_grad():
                phi = exp.learner.adapt(exp.learner.theta(), train[:kept], lrs=lrs, first_order=True)
        params = {k: (v[0] if kept else v).detach().cpu().clone() for k, v in phi.items()}
        return AdaptedPolicy(
            self.policy,
            params,
            task=task,
            returns=returns,
            episodes=episodes,
            run_dir=self.run_dir,
            cfg=self.cfg,
            action_space=self.action_space,
            kept_step=kept,
        )

    def _adapt_by_trial(self, task: dict[str, Any], *, episodes: int, seed: int, test_split: bool) -> AdaptedPolicy:
        """RL^2: trials of ``episodes`` episodes; the state of the first trial after them."""
        exp, cfg = self.experiment, self.cfg
        trials = cfg.episodes_per_task // cfg.episodes_per_trial
        sampler = exp.sampler(test=test_split, episodes=trials * episodes, episodes_per_trial=episodes)
        seeds = task_seeds(cfg.seed, TEST, ADAPT_SEED_KEY, seed, n=1)
        data = sampler.sample(self.params, [task], seeds)
        returns = [float(r) for r in exp.per_trial_episode(data.returns_per_episode(), episodes)[0]]
        context = trial_context(self.policy, self.params, data, episodes)
        return AdaptedPolicy(
            self.policy,
            dict(self.params),
            task=task,
            returns=returns,
            episodes=episodes,
            run_dir=self.run_dir,
            cfg=cfg,
            action_space=self.action_space,
            kept_step=len(returns) - 1,
            context=context,
        )

    def _adapt_by_inference(self, task: dict[str, Any], *, episodes: int, seed: int, test_split: bool) -> AdaptedPolicy:
        """PEARL: ``episodes`` episodes of context (each with ``z`` from the posterior of the ones
        before); the adapted policy is the actor at the posterior mean of all of them."""
        exp = self.experiment
        returns, contexts = exp.infer([task], episodes, (TEST, ADAPT_SEED_KEY, seed), test=test_split)
        policy = exp.policy_at(exp.posterior_mean(contexts[0]))
        return AdaptedPolicy(
            self.policy,
            {k: v.detach().clone() for k, v in policy.named_parameters()},
            task=task,
            returns=[float(r) for r in returns[0]],
            episodes=episodes,
            run_dir=self.run_dir,
            cfg=self.cfg,
            action_space=self.action_space,
            kept_step=episodes - 1,
        )


def _mean_return(data) -> float:
    """Mean episode return of one step's episodes (one task)."""
    return float(data.episodes.returns_per_episode().mean())


def _best_step(returns: list[float]) -> int:
    """The step with the highest return: the first on ties; a NaN return never wins."""
    return max(range(len(returns)), key=lambda s: returns[s] if math.isfinite(returns[s]) else -math.inf)


class AdaptedPolicy(Acting):
    """A policy adapted to one task: ``act``, ``returns`` (before and after each step), ``save``.

    ``params`` are those after ``kept_step`` inner steps (default: the last, ``len(returns) - 1``).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        params: dict[str, torch.Tensor],
        *,
        task: dict[str, Any],
        returns: list[float],
        episodes: int,
        run_dir: Path,
        cfg,
        action_space,
        kept_step: int | None = None,
        context: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.policy = policy
        self.params = params
        self.context = context
        self.task = task
        self.returns = returns
        self.episodes = episodes
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.action_space = action_space
        self.kept_step = len(returns) - 1 if kept_step is None else kept_step

    def videos(self, out_dir: str | Path, *, meta: MetaPolicy | None = None, seed: int = 0) -> list[Path]:
        """GIFs of one episode before (the meta-policy) and after adaptation, in ``out_dir``."""
        meta = meta if meta is not None else load(self.run_dir)
        out = Path(out_dir)
        paths = []
        for name, actor in (("before", meta), ("after", self)):
            try:
                env = self.make_env(render_mode="rgb_array")
            except Exception as exc:
                raise VideoUnavailable(f"{self.cfg.env_id} cannot render ({type(exc).__name__}: {exc})") from None
            try:
                paths.append(record_video(actor, env, out / f"{name}.gif", seed=seed))
            finally:
                env.close()
        return paths

    def make_env(self, **kwargs: Any) -> gym.Env:
        """A gymnasium env of the family set to this task (``gymnasium.make`` arguments pass through)."""
        env = gym.make(self.cfg.env_id, **{**self.cfg.env_kwargs(test=True), **kwargs})
        env.unwrapped.set_task(self.task, allow_out_of_range=True)
        return env

    def save(self, out_dir: str | Path) -> Path:
        """Write ``policy.pt`` (the adapted parameters) and then ``adapted.json`` (task, returns, kept
        step, source run) into ``out_dir``, each atomically; an existing policy there is replaced.

        ``run_dir`` is stored relative to ``out_dir`` (``"../.."`` for ``RUN/adapted/NAME``) and,
        as a fallback, absolute in ``run_dir_absolute``. A failed write is a one-line RunWriteError.
        """
        out = Path(out_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        with writing(out / ADAPTED_POLICY), atomic_open(out / ADAPTED_POLICY, "wb") as f:
            state: dict[str, Any] = {"model": {k: v.clone() for k, v in self.params.items()}}
            if self.context is not None:  # RL^2: the trial's state after the adaptation episodes
                state["context"] = {k: v.clone() for k, v in self.context.items()}
            torch.save(state, f)
        run = self.run_dir.resolve()
        info = {
            "run_dir": os.path.relpath(run, out.resolve()),
            "run_dir_absolute": str(run),
            "family": self.cfg.family,
            "env": self.cfg.env,
            "task": self.task,
            "episodes": self.episodes,
            "steps": len(self.returns) - 1,
            "kept_step": self.kept_step,
            "returns": self.returns,
        }
        with writing(out / ADAPTED_INFO), atomic_open(out / ADAPTED_INFO, "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        return out


def load(run_dir: str | Path) -> MetaPolicy:
    """The meta-policy of a meta-RL run directory (its latest checkpoint)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # one line for a missing directory or config
    if not isinstance(cfg, RLConfig):
        raise RunError(f"{run_dir} is a few-shot run ({cfg.family}); use metarl.app.classifier.FewShotClassifier")
    cfg.device = "cpu"
    cfg.ray.workers = 0  # adaptation of one task samples in-process
    cfg.ray.address = None
    exp, _ = restore(cfg, run_dir)
    return MetaPolicy(run_dir, exp)


def load_adapted(out_dir: str | Path) -> AdaptedPolicy:
    """An adapted policy saved by :meth:`AdaptedPolicy.save` (or ``metarl adapt --out``).

    A missing, damaged or foreign ``adapted.json`` or ``policy.pt``, or a run that cannot be found,
    raises a one-line RunError; ``policy.pt`` is read with ``weights_only=True`` (no code runs).
    """
    out = require_run_dir(out_dir, what="an adapted-policy directory (metarl adapt --out DIR)")
    info_path = out / ADAPTED_INFO
    if not info_path.is_file():
        raise RunError(f"{out} holds no {ADAPTED_INFO}: not an adapted-policy directory (metarl adapt --out DIR)")
    info = read_adapted_info(info_path)
    params, context = read_adapted_policy(out / ADAPTED_POLICY)
    run_dir = find_run(out, info)
    meta = load(run_dir)
    if info.get("family", meta.cfg.family) != meta.cfg.family:
        raise RunError(f"{info_path} is a {info['family']} policy but its run {run_dir} is {meta.cfg.family}")
    mismatch = sorted(set(params) ^ set(meta.params)) or [
        k for k in params if params[k].shape != meta.params[k].shape or params[k].dtype != meta.params[k].dtype
    ]
    if mismatch:
        raise RunError(
            f"{out / ADAPTED_POLICY} does not fit the policy of {run_dir} (parameters {', '.join(mismatch)} "
            "differ in name, shape or dtype); was it saved from another run?"
        )
    return AdaptedPolicy(
        meta.policy,
        params,
        task=info["task"],
        returns=info["returns"],
        episodes=info["episodes"],
        run_dir=run_dir,
        cfg=meta.cfg,
        action_space=meta.action_space,
        kept_step=info.get("kept_step"),
        context=context,
    )
