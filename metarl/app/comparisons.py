"""The alternatives a meta-learned policy is compared with by ``metarl evaluate --baselines``.

Every method is scored on the same held-out tasks by the mean return of ``E`` episodes after
0, 1, ..., k adaptation steps (``E`` = the run's episodes per step):

- ``meta``: the meta-learned policy, adapted with the run's inner loop;
- ``random_init``: a randomly initialised policy of the same shape, adapted with the same inner loop;
- ``pretrained``: a multi-task policy trained with stable-baselines3 PPO on the task distribution
  (a new task at every reset, the task hidden from the policy), converted to a metarl policy
  and fine-tuned with the same inner loop;
- ``ppo_scratch``: stable-baselines3 PPO from scratch on each task, one PPO update per ``E``
  episodes, i.e. the same env steps as the adaptation: step ``s`` is the return of the episodes
  collected after ``s`` PPO updates;
- ``oracle``: stable-baselines3 PPO trained long on each single task (an upper bound), scored
  by ``E`` episodes of the trained policy (the same value at every step).

PPO runs use the same MLP as the policy (hidden sizes and activation) for the actor and the
critic, on CPU. PPO acts in the env's units: with the run's ``action_scale`` its initial std is
the policy's seen through the action map (``init_std * slope``), and the multi-task policy's
parameters are mapped back to the run's policy units before the inner loop adapts them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metarl.app.baseline_jobs import STORE, Job, JobRunner
from metarl.app.export import fold_action_scale
from metarl.core.atomic import atomic_open
from metarl.core.config import ConfigError
from metarl.rl.actions import action_affine
from metarl.rl.sampling.vector import resolve_horizon
from metarl.runs.experiment import TEST, mean_and_ci95
from metarl.runs.rl import RLExperiment
from metarl.runs.rundir import writing


class _MultiTaskEnv(gym.Wrapper):
    """Draws a new task from the family's distribution at every reset (task hidden)."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        base = self.env.unwrapped
        if seed is not None:
            base.np_random = np.random.default_rng(seed)
        base.set_task(base.sample_tasks(1)[0])
        return self.env.reset(seed=seed, options=options)


class _EpisodeReturns(gym.Wrapper):
    """Records each finished episode's undiscounted return."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.returns: list[float] = []
        self._total = 0.0

    def reset(self, **kwargs):
        self._total = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._total += float(reward)
        if terminated or truncated:
            self.returns.append(self._total)
            self._total = 0.0
        return obs, reward, terminated, truncated, info


def _batch_size(n: int, most: int = 64) -> int:
    """The largest divisor of the rollout size ``n`` up to ``most`` (no truncated mini-batches)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@dataclass(frozen=True)
class PPOSetting:
    """What a PPO baseline needs from the run: plain data, so jobs can run in worker processes."""

    env_id: str
    env_kwargs: dict[str, Any]
    horizon: int
    episodes: int
    hidden: tuple[int, ...]
    activation: str
    init_std: float
    action_std_factor: float = 1.0
    """Env units per policy unit of the run's actions (``slope`` of its ``action_scale``, 1 without):
    PPO acts in env units, so its initial std is ``init_std * action_std_factor``."""

    @classmethod
    def of(cls, exp: RLExperiment) -> PPOSetting:
        cfg = exp.cfg
        return cls(
            env_id=cfg.env_id,
            env_kwargs=cfg.env_kwargs(test=True),
            horizon=resolve_horizon(cfg.env_id, cfg.horizon),
            episodes=cfg.eval.episodes_per_task or cfg.episodes_per_task,
            hidden=tuple(cfg.policy.hidden),
            activation=cfg.policy.activation,
            init_std=cfg.policy.init_std,
            action_std_factor=_action_std_factor(exp),
        )


def _action_std_factor(exp: RLExperiment) -> float:
    space = exp.task_envs[TEST].action_space
    if exp.cfg.action_scale is None or not isinstance(space, gym.spaces.Box):
        return 1.0
    return float(np.mean(action_affine(space.low, space.high, exp.cfg.action_scale)[1]))


def _policy_kwargs(s: PPOSetting) -> dict[str, Any]:
    act = torch.nn.Tanh if s.activation == "tanh" else torch.nn.ReLU
    return {
        "net_arch": {"pi": list(s.hidden), "vf": list(s.hidden)},
        "activation_fn": act,
        "log_std_init": float(np.log(s.init_std * s.action_std_factor)),
    }


def _make_env(s: PPOSetting, task: dict[str, Any] | None):
    import envs  # noqa: F401  (registers the metarl/ ids in a fresh worker process)

    env = gym.make(s.env_id, max_episode_steps=s.horizon, **s.env_kwargs)
    if task is not None:
        env.unwrapped.set_task(task, allow_out_of_range=True)
    return env


def _ppo(s: PPOSetting, env: gym.Env, *, n_steps: int, seed: int):
    """SB3 PPO with the policy's MLP for actor and critic, on CPU, mini-batches dividing the rollout."""
    from stable_baselines3 import PPO

    return PPO(
        "MlpPolicy",
        env,
        policy_kwargs=_policy_kwargs(s),
        n_steps=n_steps,
        batch_size=_batch_size(n_steps),
        seed=seed,
        device="cpu",
        verbose=0,
    )


def with_policy_params(exp: RLExperiment, params: dict[str, torch.Tensor], fn):
    """Run ``fn()`` with the experiment's policy holding ``params``, then restore it."""
    saved = copy.deepcopy(exp.policy.state_dict())
    with torch.no_grad():
        for name, p in exp.policy.named_parameters():
            p.copy_(params[name])
    try:
        return fn()
    finally:
        exp.policy.load_state_dict(saved)


def meta_curve(exp: RLExperiment, *, num_tasks: int, steps: int, seed: int) -> np.ndarray:
    return exp.curve(TEST, seed, num_tasks, steps=steps)


def random_init_curve(exp: RLExperiment, *, num_tasks: int, steps: int, seed: int) -> np.ndarray:
    torch.manual_seed(10_000 + seed)
    fresh = type(exp.policy)(
        exp.policy.obs_dim,
        exp.policy.out.out_features,
        hidden=exp.cfg.policy.hidden,
        activation=exp.cfg.policy.activation,
        **({"init_std": exp.cfg.policy.init_std} if not exp.policy.discrete else {}),
    )
    params = {k: v.detach().to(exp.device) for k, v in fresh.named_parameters()}
    return with_policy_params(exp, params, lambda: exp.curve(TEST, seed, num_tasks, steps=steps))


def pretrain_job(s: PPOSetting, total_steps: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """SB3 PPO on the task distribution (task hidden): the actor's parameters and the wall time."""
    from metarl.app.export import from_sb3

    t0 = time.perf_counter()
    model = _ppo(s, _MultiTaskEnv(_make_env(s, None)), n_steps=max(64, 10 * s.horizon), seed=seed)
    model.learn(total_timesteps=total_steps)
    policy = from_sb3(model)
    return {k: v.detach() for k, v in policy.named_parameters()}, time.perf_counter() - t0


def pretrained_curve(
    exp: RLExperiment, params: dict[str, torch.Tensor], *, num_tasks: int, steps: int, seed: int
) -> np.ndarray:
    own = dict(exp.policy.named_parameters())
    if exp.cfg.action_scale is not None:  # PPO acted in env units: back to the run's policy units
        params = fold_action_scale(params, exp.task_envs[TEST].action_space, exp.cfg.action_scale, inverse=True)
    fitted = {k: params[k].to(own[k].dtype).to(exp.device) if k in params else own[k].detach() for k in own}
    if "log_std" in fitted and "log_std" in params:
        fitted["log_std"] = params["log_std"].clamp(min=exp.policy.min_log_std).to(exp.device)
    return with_policy_params(exp, fitted, lambda: exp.curve(TEST, seed, num_tasks, steps=steps))


def ppo_scratch_job(s: PPOSetting, task: dict[str, Any], steps: int, seed: int) -> tuple[list[float], float]:
    """PPO from scratch on one task with the adaptation's budget: the return after 0..steps PPO updates."""
    t0 = time.perf_counter()
    env = _EpisodeReturns(_make_env(s, task))
    model = _ppo(s, env, n_steps=s.episodes * s.horizon, seed=seed)
    row = []
    for _ in range(steps + 1):  # each learn() call: one rollout of `episodes` episodes, then one PPO update
        start = len(env.returns)
        model.learn(total_timesteps=s.episodes * s.horizon, reset_num_timesteps=False)
        row.append(float(np.mean(env.returns[start:])) if len(env.returns) > start else float("nan"))
    return row, time.perf_counter() - t0


def oracle_job(s: PPOSetting, task: dict[str, Any], total_steps: int, seed: int) -> tuple[float, float]:
    """PPO trained for ``total_steps`` on one task, scored by ``E`` fresh episodes."""
    t0 = time.perf_counter()
    model = _ppo(s, _make_env(s, task), n_steps=max(64, 10 * s.horizon), seed=seed)
    model.learn(total_timesteps=total_steps)
    return _score(model, _make_env(s, task), s.episodes, seed=seed), time.perf_counter() - t0


def _score(model, env: gym.Env, episodes: int, *, seed: int) -> float:
    """Mean return of ``episodes`` episodes of the model's stochastic policy (as the others are scored)."""
    total = 0.0
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=False)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
    return total / episodes


METHODS = ("meta", "random_init", "pretrained", "ppo_scratch", "oracle")
#: Defaults of ``metarl evaluate --baselines``: minutes on a laptop (the README says how to ask for more).
DEFAULT_PRETRAIN_STEPS = 200_000
DEFAULT_ORACLE_STEPS = 100_000
DEFAULT_ORACLE_TASKS = 5


def evaluate_with_baselines(
    exp: RLExperiment,
    *,
    num_tasks: int,
    steps: int,
    seed: int,
    pretrain_steps: int,
    oracle_steps: int,
    oracle_tasks: int,
    jobs: int = 1,
    store: Path | None = None,
    address: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Every method's return after 0..steps adaptation steps on the same held-out tasks, mean and 95% CI.

    The PPO runs (the multi-task policy, PPO from scratch on each task, each oracle) are
    independent jobs, each seeded by its own task index, run by a
    :class:`~metarl.app.baseline_jobs.JobRunner`: ``jobs > 1`` or a Ray ``address`` makes them
    Ray tasks (retried when their process dies) while this process scores the meta-policy and
    the random initialisation; each finished job is kept under ``store`` and not run again by a
    later call. The figures depend on neither ``jobs``, Ray nor the kept results. A method's
    ``seconds`` is the time of its jobs added up, as measured when each ran.
    """
    s = PPOSetting.of(exp)

    def task_seed(i: int) -> int:
        return seed * 100_003 + i

    tasks = exp.sample_tasks(TEST, seed, num_tasks)
    oracle_draw = exp.sample_tasks(TEST, seed, oracle_tasks)
    runner = JobRunner(store, workers=jobs, address=address, log=log)
    # longest first, so that the workers finish together
    runner.start(
        [Job("pretrain", pretrain_job, (s, pretrain_steps, seed))]
        + [Job(f"oracle-{i}", oracle_job, (s, task, oracle_steps, task_seed(i))) for i, task in enumerate(oracle_draw)]
        + [Job(f"scratch-{i}", ppo_scratch_job, (s, task, steps, task_seed(i))) for i, task in enumerate(tasks)]
    )

    def summary(values: np.ndarray, seconds: float) -> dict[str, Any]:
        return {**mean_and_ci95(np.asarray(values)), "seconds": round(seconds, 1)}

    methods: dict[str, Any] = {}
    t0 = time.perf_counter()
    methods["meta"] = summary(meta_curve(exp, num_tasks=num_tasks, steps=steps, seed=seed), time.perf_counter() - t0)
    log("meta done")
    t0 = time.perf_counter()
    methods["random_init"] = summary(
        random_init_curve(exp, num_tasks=num_tasks, steps=steps, seed=seed), time.perf_counter() - t0
    )
    log("random_init done")
    done = runner.results()
    params, pretrain_s = done["pretrain"]
    t0 = time.perf_counter()
    methods["pretrained"] = summary(
        pretrained_curve(exp, params, num_tasks=num_tasks, steps=steps, seed=seed),
        pretrain_s + time.perf_counter() - t0,
    )
    methods["pretrained"]["pretrain_env_steps"] = pretrain_steps
    log(f"pretrained done ({pretrain_steps} PPO steps)")
    rows = [done[f"scratch-{i}"] for i in range(num_tasks)]
    methods["ppo_scratch"] = summary([r for r, _ in rows], sum(t for _, t in rows))
    log("ppo_scratch done")
    scores = [done[f"oracle-{i}"] for i in range(oracle_tasks)]
    methods["oracle"] = summary(
        np.repeat(np.asarray([v for v, _ in scores])[:, None], steps + 1, axis=1), sum(t for _, t in scores)
    )
    methods["oracle"]["train_env_steps_per_task"] = oracle_steps
    log("oracle done")
    return {
        "metric": "return",
        "steps": list(range(steps + 1)),
        "num_tasks": num_tasks,
        "jobs": jobs,
        "methods": methods,
    }


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def evaluate_baselines_command(args, exp, run_dir: Path, iteration: int, num_tasks: int, steps: int) -> int:
    """``metarl evaluate RUN --baselines``: the comparison table, ``eval_baselines.json`` / ``.png`` and
    TensorBoard curves; the PPO jobs kept in ``RUN/baseline_jobs/``."""
    from torch.utils.tensorboard import SummaryWriter

    from metarl.app.plot import plot_adaptation

    pretrain = args.pretrain_steps if args.pretrain_steps is not None else min(exp.env_steps, DEFAULT_PRETRAIN_STEPS)
    if pretrain < 1 or args.oracle_steps < 1 or args.oracle_tasks < 1:
        raise ConfigError("--pretrain-steps, --oracle-steps and --oracle-tasks must be >= 1")
    oracle_tasks = min(args.oracle_tasks, num_tasks)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = args.jobs or usable_cores()
    t0 = time.perf_counter()
    result = evaluate_with_baselines(
        exp,
        num_tasks=num_tasks,
        steps=steps,
        seed=args.seed,
        pretrain_steps=pretrain,
        oracle_steps=args.oracle_steps,
        oracle_tasks=oracle_tasks,
        jobs=jobs,
        store=run_dir / STORE,
        address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
        log=lambda m: print(f"  {m} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True),
    )
    result["iteration"] = iteration
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{run_dir} at iteration {iteration}: return on {num_tasks} held-out tasks after 0..{steps} adaptation steps")
    print(f"{'method':<12} " + "  ".join(f"{'step ' + str(s):>16}" for s in result["steps"]))
    for name, m in result["methods"].items():
        print(f"{name:<12} " + "  ".join(f"{mu:>8.2f} +- {ci:<5.2f}" for mu, ci in zip(m["mean"], m["ci95"])))
    text = json.dumps(result, indent=2) + "\n"
    for path in [run_dir / "eval_baselines.json"] + ([Path(args.json)] if args.json else []):
        with writing(path), atomic_open(path, "w") as f:
            f.write(text)
    with writing(run_dir / "eval_baselines.png"):
        plot_adaptation(result, run_dir / "eval_baselines.png", title=f"{run_dir.name}: return by adaptation step")
    with writing(run_dir / "eval"):
        writer = SummaryWriter(log_dir=str(run_dir / "eval"))
        for name, m in result["methods"].items():
            for s, value in zip(result["steps"], m["mean"]):
                writer.add_scalar(f"eval/return_{name}", value, s)
        writer.close()
    print(
        f"wrote {run_dir / 'eval_baselines.json'}, {run_dir / 'eval_baselines.png'} and TensorBoard curves "
        f"(eval/return_<method>, step = adaptation step)"
    )
    return 0
