"""Sampler speed: env steps/s through the samplers next to the bare simulator, in one run.

- HalfCheetahVel, 40 tasks x 20 episodes x 100 steps with the real Gaussian MLP policy (64-64
  tanh): the in-process :class:`VectorSampler` and the :class:`RaySampler` with 1 and 2 workers,
  next to gymnasium's plain ``HalfCheetah-v5`` stepped in a bare loop with no policy, replaying
  the actions the policy took in an untimed warm-up call (so both loops simulate the same
  motion). Goal: the Ray sampler reaches at least 70% of the bare loop's rate times the number
  of workers.
- Navigation2D at the same shape, in-process (goal: at least 1 million env steps/s).

Measurements are interleaved (bare, in-process, Ray 1, Ray 2, ... repeated) so machine noise
hits all alike; medians are reported. Ray's start-up and the actors' env construction happen
before timing (a first untimed call). Results go to ``experiments/results/sampling.json`` with
the machine and date. Usage::

    python experiments/sampling/benchmark.py [--repeats 3] [--tasks 40] [--episodes 20] [--horizon 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401
from agents.policies import make_policy
from metarl.rl.sampling import RaySampler, VectorSampler, init_ray, task_seeds

ROOT = Path(__file__).resolve().parents[2]


def bare_loop(steps: int, actions: np.ndarray | None = None) -> float:
    """Steps/s of gymnasium's HalfCheetah-v5 in a plain loop, resetting at episode ends.

    ``actions`` (``[steps, 6]``): replayed as given, e.g. the actions the sampler's policy took,
    clipped to the bounds, so that both loops simulate the same motion (MuJoCo's cost per step
    depends on the contacts the motion makes); default N(0, 1) clipped.
    """
    env = gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05, max_episode_steps=100)
    if actions is None:
        actions = np.clip(np.random.default_rng(0).normal(size=(steps, 6)), -1, 1).astype(np.float32)
    actions = actions[:steps]
    env.reset(seed=0)
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - t0)


def sample_tasks(env_id: str, n: int) -> list[dict]:
    env = gym.make(env_id)
    env.reset(seed=0)
    return env.unwrapped.sample_tasks(n)


def timed(sample) -> float:
    t0 = time.perf_counter()
    episodes = sample()
    return episodes.num_steps() / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "sampling.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, e, h = args.tasks, args.episodes, args.horizon
    steps = n * e * h

    cheetah = "metarl/HalfCheetahVel-v0"
    local = VectorSampler(cheetah, episodes_per_task=e, horizon=h)
    policy = make_policy(local.observation_space, local.action_space)
    tasks = sample_tasks(cheetah, n)
    init_ray(num_cpus=3)  # 1 + 2 actors alive at once (interleaved); only one sampler runs at a time
    rays = {w: RaySampler(cheetah, policy=policy, episodes_per_task=e, horizon=h, num_workers=w) for w in (1, 2)}
    params = policy.params()

    nav = "metarl/Navigation2D-v0"
    nav_sampler = VectorSampler(nav, episodes_per_task=e, horizon=h)
    nav_policy = make_policy(nav_sampler.observation_space, nav_sampler.action_space)
    nav_tasks = sample_tasks(nav, n)

    # warm-up (env construction in every sampler and actor), not timed; its episodes' actions
    # (clipped to the bounds, episode after episode) are what the bare loop replays
    warm = local.sample(policy, params, tasks, task_seeds(0, 0, n=n))
    replay = np.clip(warm.actions.transpose(1, 2).reshape(-1, 6).numpy(), -1, 1)
    for sampler in rays.values():
        sampler.sample(params, tasks, task_seeds(0, 0, n=n))
    nav_sampler.sample(nav_policy, nav_policy.params(), nav_tasks, task_seeds(0, 0, n=n))

    rates: dict[str, list[float]] = {
        k: [] for k in ("bare_loop", "in_process", "ray_1_worker", "ray_2_workers", "navigation2d")
    }
    for r in range(1, args.repeats + 1):
        seeds = task_seeds(0, r, n=n)
        rates["bare_loop"].append(bare_loop(min(steps, 20_000), replay))
        rates["in_process"].append(timed(lambda seeds=seeds: local.sample(policy, params, tasks, seeds)))
        rates["ray_1_worker"].append(timed(lambda seeds=seeds: rays[1].sample(params, tasks, seeds)))
        rates["ray_2_workers"].append(timed(lambda seeds=seeds: rays[2].sample(params, tasks, seeds)))
        rates["navigation2d"].append(
            timed(lambda seeds=seeds: nav_sampler.sample(nav_policy, nav_policy.params(), nav_tasks, seeds))
        )
        print(json.dumps({k: round(v[-1]) for k, v in rates.items()}), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    bare = med["bare_loop"]
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"tasks": n, "episodes_per_task": e, "horizon": h, "steps_per_call": steps},
        "repeats": args.repeats,
        "halfcheetah_vel": {
            "bare_loop_steps_per_s": round(bare),
            "in_process_steps_per_s": round(med["in_process"]),
            "ray_1_worker_steps_per_s": round(med["ray_1_worker"]),
            "ray_2_workers_steps_per_s": round(med["ray_2_workers"]),
            "in_process_vs_bare": round(med["in_process"] / bare, 3),
            "ray_1_worker_vs_bare": round(med["ray_1_worker"] / bare, 3),
            "ray_2_workers_vs_2x_bare": round(med["ray_2_workers"] / (2 * bare), 3),
            "goal": "ray_W_workers >= 0.7 * W * bare_loop",
        },
        "navigation2d": {"in_process_steps_per_s": round(med["navigation2d"]), "goal": ">= 1,000,000"},
        "raw": {k: [round(x) for x in v] for k, v in rates.items()},
    }
    print(json.dumps(record, indent=2))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    for sampler in rays.values():
        sampler.close()


if __name__ == "__main__":
    main()
