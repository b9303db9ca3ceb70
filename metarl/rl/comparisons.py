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
critic, on CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metarl.rl.experiment import TEST, RLExperiment, mean_and_ci95


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


def _policy_kwargs(exp: RLExperiment) -> dict[str, Any]:
    p = exp.cfg.policy
    act = torch.nn.Tanh if p.activation == "tanh" else torch.nn.ReLU
    return {"net_arch": {"pi": list(p.hidden), "vf": list(p.hidden)}, "activation_fn": act,
            "log_std_init": float(np.log(p.init_std))}


def _make_env(exp: RLExperiment, task: dict[str, Any] | None):
    cfg = exp.cfg
    env = gym.make(cfg.env_id, max_episode_steps=exp.sampler().horizon, **cfg.env_kwargs(test=True))
    if task is not None:
        env.unwrapped.set_task(task, allow_out_of_range=True)
    return env


def _ppo(exp: RLExperiment, env: gym.Env, *, n_steps: int, seed: int):
    """SB3 PPO with the policy's MLP for actor and critic, on CPU, mini-batches dividing the rollout."""
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", env, policy_kwargs=_policy_kwargs(exp), n_steps=n_steps, batch_size=_batch_size(n_steps),
               seed=seed, device="cpu", verbose=0)


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
    fresh = type(exp.policy)(exp.policy.obs_dim, exp.policy.out.out_features, hidden=exp.cfg.policy.hidden,
                             activation=exp.cfg.policy.activation,
                             **({"init_std": exp.cfg.policy.init_std} if not exp.policy.discrete else {}))
    params = {k: v.detach().to(exp.device) for k, v in fresh.named_parameters()}
    return with_policy_params(exp, params, lambda: exp.curve(TEST, seed, num_tasks, steps=steps))


def pretrain_multitask(exp: RLExperiment, *, total_steps: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """SB3 PPO on the task distribution (task hidden): the actor's parameters and the wall time."""
    import time

    from metarl.export import from_sb3

    env = _MultiTaskEnv(_make_env(exp, None))
    model = _ppo(exp, env, n_steps=max(64, 10 * exp.sampler().horizon), seed=seed)
    t0 = time.perf_counter()
    model.learn(total_timesteps=total_steps)
    policy = from_sb3(model)
    return {k: v.detach() for k, v in policy.named_parameters()}, time.perf_counter() - t0


def pretrained_curve(exp: RLExperiment, params: dict[str, torch.Tensor], *, num_tasks: int, steps: int,
                     seed: int) -> np.ndarray:
    own = dict(exp.policy.named_parameters())
    fitted = {k: params[k].to(own[k].dtype).to(exp.device) if k in params else own[k].detach() for k in own}
    if "log_std" in fitted and "log_std" in params:
        fitted["log_std"] = params["log_std"].clamp(min=exp.policy.min_log_std).to(exp.device)
    return with_policy_params(exp, fitted, lambda: exp.curve(TEST, seed, num_tasks, steps=steps))


def ppo_scratch_curve(exp: RLExperiment, *, num_tasks: int, steps: int, seed: int) -> np.ndarray:
    """PPO from scratch per task with the adaptation's budget: ``[num_tasks, steps + 1]``."""
    episodes = exp.cfg.eval.episodes_per_task or exp.cfg.episodes_per_task
    horizon = exp.sampler().horizon
    tasks = exp.sample_tasks(TEST, seed, num_tasks)
    rows = []
    for i, task in enumerate(tasks):
        env = _EpisodeReturns(_make_env(exp, task))
        model = _ppo(exp, env, n_steps=episodes * horizon, seed=seed * 100_003 + i)
        row = []
        for _ in range(steps + 1):  # each learn() call: one rollout of `episodes` episodes, then one PPO update
            start = len(env.returns)
            model.learn(total_timesteps=episodes * horizon, reset_num_timesteps=False)
            row.append(float(np.mean(env.returns[start:])) if len(env.returns) > start else float("nan"))
        rows.append(row)
    return np.asarray(rows)


def oracle_curve(exp: RLExperiment, *, num_tasks: int, steps: int, seed: int, total_steps: int) -> np.ndarray:
    """PPO trained for ``total_steps`` on each task, scored by ``E`` fresh episodes (constant across steps)."""
    episodes = exp.cfg.eval.episodes_per_task or exp.cfg.episodes_per_task
    horizon = exp.sampler().horizon
    tasks = exp.sample_tasks(TEST, seed, num_tasks)
    scores = []
    for i, task in enumerate(tasks):
        model = _ppo(exp, _make_env(exp, task), n_steps=max(64, 10 * horizon), seed=seed * 100_003 + i)
        model.learn(total_timesteps=total_steps)
        scores.append(_score(model, _make_env(exp, task), episodes, seed=seed * 100_003 + i))
    return np.repeat(np.asarray(scores)[:, None], steps + 1, axis=1)


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


def evaluate_with_baselines(exp: RLExperiment, *, num_tasks: int, steps: int, seed: int, pretrain_steps: int,
                            oracle_steps: int, oracle_tasks: int, log=print) -> dict[str, Any]:
    """Every method's return after 0..steps adaptation steps on the same held-out tasks, mean and 95% CI."""
    import time

    def summary(values: np.ndarray, seconds: float) -> dict[str, Any]:
        return {**mean_and_ci95(values), "seconds": round(seconds, 1)}

    methods: dict[str, Any] = {}
    t0 = time.perf_counter()
    methods["meta"] = summary(meta_curve(exp, num_tasks=num_tasks, steps=steps, seed=seed), time.perf_counter() - t0)
    log("meta done")
    t0 = time.perf_counter()
    methods["random_init"] = summary(random_init_curve(exp, num_tasks=num_tasks, steps=steps, seed=seed),
                                     time.perf_counter() - t0)
    log("random_init done")
    params, pretrain_s = pretrain_multitask(exp, total_steps=pretrain_steps, seed=seed)
    t0 = time.perf_counter()
    methods["pretrained"] = summary(pretrained_curve(exp, params, num_tasks=num_tasks, steps=steps, seed=seed),
                                    pretrain_s + time.perf_counter() - t0)
    methods["pretrained"]["pretrain_env_steps"] = pretrain_steps
    log(f"pretrained done ({pretrain_steps} PPO steps)")
    t0 = time.perf_counter()
    methods["ppo_scratch"] = summary(ppo_scratch_curve(exp, num_tasks=num_tasks, steps=steps, seed=seed),
                                     time.perf_counter() - t0)
    log("ppo_scratch done")
    t0 = time.perf_counter()
    methods["oracle"] = summary(oracle_curve(exp, num_tasks=oracle_tasks, steps=steps, seed=seed,
                                             total_steps=oracle_steps), time.perf_counter() - t0)
    methods["oracle"]["train_env_steps_per_task"] = oracle_steps
    log("oracle done")
    return {"metric": "return", "steps": list(range(steps + 1)), "num_tasks": num_tasks, "methods": methods}
