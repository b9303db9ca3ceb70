"""Env speed: steps/s of every task family next to its plain gymnasium parent, in one run.

Each family (``metarl/<Name>-v0``) and its parent (e.g. ``HalfCheetah-v5`` with the same
constructor arguments) are made with ``gymnasium.make`` (so both carry the same wrappers), reset,
and stepped with the same pre-drawn random actions, resetting at episode ends. Repeats are
interleaved (family, parent, family, parent, ...) so machine noise hits both alike; the median
rates are reported, and the task machinery's cost as ``1 - median(family / parent)`` over the
repeats' rate ratios (goal: under 10% of a step). Navigation2D has no
gymnasium parent: it is shown single and natively vectorized. Results go to
``experiments/results/envs.json`` with the machine and date. Usage::

    python experiments/envs/benchmark.py [--steps 5000] [--repeats 5] [NAME ...]
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

import envs
from envs.vector import make_task_vector_env

ROOT = Path(__file__).resolve().parents[2]

# family -> (parent id, parent kwargs); the family env gets a sampled task first
PARENTS: dict[str, tuple[str | None, dict]] = {
    "Navigation2D": (None, {}),
    "HalfCheetahVel": ("HalfCheetah-v5", {"ctrl_cost_weight": 0.05}),
    "HalfCheetahDir": ("HalfCheetah-v5", {"ctrl_cost_weight": 0.05}),
    "AntVel": ("Ant-v5", {}),
    "AntDir": ("Ant-v5", {}),
    "AntDir2D": ("Ant-v5", {}),
    "AntGoal": ("Ant-v5", {"exclude_current_positions_from_observation": False, "terminate_when_unhealthy": False}),
    "HalfCheetahRandParams": ("HalfCheetah-v5", {}),
    "HopperRandParams": ("Hopper-v5", {}),
    "Walker2dRandParams": ("Walker2d-v5", {}),
    # Meta-World: the parent is the raw Meta-World env inside the family env, given the same
    # wrappers that gymnasium.make() puts around the family (env checker, order enforcing,
    # time limit 500), so the figure is the cost of the task machinery alone.
    "MetaWorld-ML1": ("metaworld", {"task_name": "reach-v3"}),
}


def steps_per_second(env: gym.Env, actions: np.ndarray, seed: int) -> float:
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return len(actions) / (time.perf_counter() - t0)


def vector_steps_per_second(env, actions: np.ndarray) -> float:
    env.reset(seed=0)
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    return actions.shape[0] * actions.shape[1] / (time.perf_counter() - t0)


def bench_family(name: str, steps: int, repeats: int) -> dict:
    env_id = f"{envs.NAMESPACE}/{name}-v0"
    parent_id, parent_kwargs = PARENTS[name]
    family = gym.make(env_id, **(parent_kwargs if parent_id == "metaworld" else {}))
    family.reset(seed=0)
    family.unwrapped.set_task(family.unwrapped.sample_tasks(1)[0])
    rng = np.random.default_rng(0)
    actions = rng.uniform(
        family.action_space.low, family.action_space.high, size=(steps, *family.action_space.shape)
    ).astype(np.float32)
    if parent_id is None:  # Navigation2D: single env against the native vector env (100 envs)
        vec = make_task_vector_env(env_id, 100)
        vec_actions = rng.uniform(-0.1, 0.1, size=(max(steps // 100, 1) * 10, 100, 2)).astype(np.float32)
        rates = {"family": [], "vector_100_envs": []}
        for _ in range(repeats):
            rates["family"].append(steps_per_second(family, actions, 0))
            rates["vector_100_envs"].append(vector_steps_per_second(vec, vec_actions))
        med = {k: statistics.median(v) for k, v in rates.items()}
        return {
            "env": env_id,
            "steps_per_s": round(med["family"]),
            "vector_100_envs_steps_per_s": round(med["vector_100_envs"]),
        }
    if parent_id == "metaworld":
        raw = family.unwrapped._env
        parent = gym.wrappers.TimeLimit(
            gym.wrappers.OrderEnforcing(gym.wrappers.PassiveEnvChecker(raw)),
            max_episode_steps=family.spec.max_episode_steps,
        )
    else:
        parent = gym.make(parent_id, **parent_kwargs)
    rates = {"family": [], "parent": []}
    for _ in range(repeats):
        rates["family"].append(steps_per_second(family, actions, 0))
        rates["parent"].append(steps_per_second(parent, actions, 0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = statistics.median(f / p for f, p in zip(rates["family"], rates["parent"]))
    return {
        "env": env_id,
        "parent": parent_id,
        "steps_per_s": round(med["family"]),
        "parent_steps_per_s": round(med["parent"]),
        "overhead": round(1 - ratio, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="families (default: all registered)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "envs.json")
    args = parser.parse_args()
    names = args.names or [n for n in PARENTS if f"{envs.NAMESPACE}/{n}-v0" in gym.registry]
    results = {}
    for name in names:
        results[name] = bench_family(name, args.steps, args.repeats)
        print(json.dumps({name: results[name]}), flush=True)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
