"""Sampler speed against the physics limit, for every kind of family, in one run.

For each family at its reference shape (tasks x episodes x horizon), steady-state env steps/s of:

- ``reference``: the in-process :class:`VectorSampler` stepping each env's own ``step`` (the path
  before batched physics, ``sampler.batch_physics=false``): today's rate before this change;
- ``in_process_1t`` / ``in_process_2t``: the in-process sampler with batched physics on 1 and 2
  physics threads (``sampler.physics_threads``);
- ``ray_1w`` / ``ray_2w``: the :class:`RaySampler` with 1 and 2 workers (batched physics, 1 thread each);
- ``physics_1t`` / ``physics_2t``: the physics limit, ``mujoco.rollout`` of the same envs (same
  models, same number of envs, the same actions replayed, ``frame_skip`` MuJoCo steps per control
  step) with 1 and 2 threads, no policy and no Python per step. For Meta-World the rollout drives
  the gripper controls only (the arm follows a mocap target that ``rollout`` does not move), i.e.
  the physics of the same model for the same number of steps.

Every sampler uses the real Gaussian MLP policy. Each sampler is warmed up (env construction, Ray
start-up) before timing; repeats are interleaved so machine noise hits all alike; medians are
reported with each rate's ratio to the physics limit at the same number of threads. Results go to
``experiments/results/sampling.json`` with the machine and date; ``--merge`` adds the measured
families to an existing file (each keeps its own date and repeats). ``--table`` prints the README
table of a results file. Usage::

    python experiments/sampling/benchmark.py [--repeats 3] [--families halfcheetah_vel,ant_dir,...] [--merge]
    python experiments/sampling/benchmark.py --table [--results experiments/results/sampling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import torch
from mujoco import rollout

import envs  # noqa: F401
from agents.policies import make_policy
from metarl.rl.sampling import RaySampler, VectorSampler, init_ray, task_seeds

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Family:
    env_id: str
    tasks: int
    episodes: int
    horizon: int
    env_kwargs: dict = field(default_factory=dict)
    action_scale: float | None = None


FAMILIES = {
    # the reference configs' shapes (experiments/<family>/maml_trpo.yaml)
    "halfcheetah_vel": Family("metarl/HalfCheetahVel-v0", 40, 20, 100, action_scale=10.0),
    "ant_dir": Family("metarl/AntDir-v0", 40, 20, 100, action_scale=10.0),
    "metaworld_ml1_reach": Family("metarl/MetaWorld-ML1-v0", 10, 10, 500, {"task_name": "reach-v3"}),
    "metaworld_ml1_push": Family("metarl/MetaWorld-ML1-v0", 10, 10, 500, {"task_name": "push-v3"}),
    "metaworld_ml10": Family("metarl/MetaWorld-ML10-v0", 10, 10, 500),
    "navigation2d": Family("metarl/Navigation2D-v0", 40, 20, 100),
}


def sample_tasks(fam: Family) -> list[dict]:
    env = gym.make(fam.env_id, **fam.env_kwargs)
    env.reset(seed=0)
    if "ML10" in fam.env_id:  # one task of each of the 10 train classes
        names = env.unwrapped.env_names
        return [{"env_name": names[i % len(names)], "index": i} for i in range(fam.tasks)]
    return env.unwrapped.sample_tasks(fam.tasks)


def timed(sample) -> float:
    t0 = time.perf_counter()
    episodes = sample()
    return episodes.num_steps() / (time.perf_counter() - t0)


class PhysicsLimit:
    """``mujoco.rollout`` of the sampler's envs: their models and reset states, the sampled actions."""

    def __init__(self, sampler: VectorSampler, actions: np.ndarray, steps: int) -> None:
        batch = sampler._batch
        env_list = [getattr(env, "metaworld_env", env) for env in batch.envs]
        self.groups: dict[tuple, list] = {}
        for i, env in enumerate(env_list):  # rollout needs one size signature per call (ML10: per class)
            self.groups.setdefault((env.model.nq, env.model.nv, env.model.nu, type(env).__name__), []).append(i)
        self.env_list = env_list
        spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self.states = {}
        self.controls = {}
        for key, index in self.groups.items():
            models = [env_list[i].model for i in index]
            states = np.empty((len(index), mujoco.mj_stateSize(models[0], spec)))
            for row, i in enumerate(index):
                mujoco.mj_getState(env_list[i].model, env_list[i].data, states[row], spec)
            skip = env_list[index[0]].frame_skip
            nu = models[0].nu
            acts = (
                actions[index][:, :, :nu] if actions.shape[-1] >= nu else np.zeros((len(index), actions.shape[1], nu))
            )
            self.states[key] = states
            self.controls[key] = np.repeat(acts, skip, axis=1)  # [n, H * skip, nu]
        self.steps = steps

    def rate(self, threads: int) -> float:
        t_total = 0.0
        with rollout.Rollout(nthread=threads) as pool:
            for key, index in self.groups.items():
                models = [self.env_list[i].model for i in index]
                datas = [mujoco.MjData(models[0]) for _ in range(threads)]
                t0 = time.perf_counter()
                pool.rollout(models, datas, self.states[key], self.controls[key])
                t_total += time.perf_counter() - t0
        return self.steps / t_total


def measure(name: str, fam: Family, repeats: int, ray_workers: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    common = dict(episodes_per_task=fam.episodes, horizon=fam.horizon, env_kwargs=fam.env_kwargs)
    common["action_scale"] = fam.action_scale
    samplers = {
        "reference": VectorSampler(fam.env_id, batch_physics=False, **common),
        "in_process_1t": VectorSampler(fam.env_id, physics_threads=1, **common),
        "in_process_2t": VectorSampler(fam.env_id, physics_threads=2, **common),
    }
    policy = make_policy(samplers["reference"].observation_space, samplers["reference"].action_space)
    params = policy.params()
    tasks = sample_tasks(fam)
    n = len(tasks)
    local = {k: partial(s.sample, policy, params, tasks) for k, s in samplers.items()}
    rays = {}
    if not samplers["in_process_1t"].batch_physics:  # Navigation2D: one native vector env, no physics
        local = {"in_process": local["reference"]}
    else:
        for w in ray_workers:
            kw = {**common, "num_workers": w}
            rays[f"ray_{w}w"] = RaySampler(fam.env_id, policy=policy, **kw)
    runners = {**local, **{k: partial(r.sample, params, tasks) for k, r in rays.items()}}
    print(f"{name}: warming up {len(runners)} samplers ({n} tasks x {fam.episodes} episodes)", flush=True)
    warm = None
    for key, run in runners.items():
        episodes = run(task_seeds(0, 0, n=n))
        if key == "in_process_1t":
            warm = episodes
    rates: dict[str, list[float]] = {k: [] for k in runners}
    limit = None
    if warm is not None:
        sampler = samplers["in_process_1t"]
        acts = warm.actions.transpose(1, 2).reshape(n * fam.episodes, fam.horizon, -1).numpy()
        if sampler._action_map is not None:
            acts = sampler._action_map(acts.reshape(-1, acts.shape[-1])).reshape(acts.shape)
        sampler._batch.reset(np.arange(n * fam.episodes))
        limit = PhysicsLimit(sampler, acts.astype(np.float64), n * fam.episodes * fam.horizon)
        rates.update({"physics_1t": [], "physics_2t": []})
    for r in range(1, repeats + 1):
        seeds = task_seeds(0, r, n=n)
        for key, run in runners.items():
            rates[key].append(timed(partial(run, seeds)))
        if limit is not None:
            rates["physics_1t"].append(limit.rate(1))
            rates["physics_2t"].append(limit.rate(2))
        print(name, json.dumps({k: round(v[-1]) for k, v in rates.items()}), flush=True)
    med = {k: round(statistics.median(v)) for k, v in rates.items()}
    out = {"shape": {"tasks": n, "episodes_per_task": fam.episodes, "horizon": fam.horizon}, "steps_per_s": med}
    if limit is not None:
        out["vs_physics_limit"] = {
            k: round(v / (med["physics_2t"] if k in ("in_process_2t", "ray_2w") else med["physics_1t"]), 3)
            for k, v in med.items()
            if not k.startswith("physics")
        }
        out["speedup_vs_reference"] = {
            k: round(v / med["reference"], 2) for k, v in med.items() if not k.startswith(("physics", "reference"))
        }
    out["raw"] = {k: [round(x) for x in v] for k, v in rates.items()}
    for sampler in samplers.values():
        sampler.close()
    for sampler in rays.values():
        sampler.close()
    return out


LABELS = {
    "halfcheetah_vel": "HalfCheetahVel",
    "ant_dir": "AntDir",
    "metaworld_ml1_reach": "Meta-World ML1 reach",
    "metaworld_ml1_push": "Meta-World ML1 push",
    "metaworld_ml10": "Meta-World ML10",
    "navigation2d": "Navigation2D",
}


def table(record: dict) -> str:
    """The README's sampling table: env steps/s, (fraction of the physics limit), speed-up."""

    def k(x: float) -> str:
        return f"{x / 1000:.2f}k" if x < 10_000 else f"{x / 1000:.1f}k"

    cols = ["reference", "in_process_1t", "in_process_2t", "ray_1w", "ray_2w"]
    lines = [
        "| family (tasks x episodes x horizon) | reference path | batched, 1 thread | batched, 2 threads "
        "| Ray, 1 worker | Ray, 2 workers | physics limit 1 / 2 threads | date, repeats |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, fam in record["families"].items():
        rate, frac, up = fam["steps_per_s"], fam.get("vs_physics_limit", {}), fam.get("speedup_vs_reference", {})
        shape = fam["shape"]
        cells = [f"{LABELS.get(name, name)} ({shape['tasks']} x {shape['episodes_per_task']} x {shape['horizon']})"]
        for c in cols:
            if c not in rate:
                cells.append("—")
                continue
            cell = f"{k(rate[c])} ({frac[c]:.2f})" if c in frac else k(rate[c])
            cells.append(cell + (f", {up[c]:.2f}x" if c in up else ""))
        limit = f"{k(rate['physics_1t'])} / {k(rate['physics_2t'])}" if "physics_1t" in rate else "—"
        cells += [limit, f"{fam.get('date', record['date'])}, {fam.get('repeats', record['repeats'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
    parser.add_argument("--ray-workers", default="1,2")
    parser.add_argument("--tasks", type=int, default=None, help="override every family's task count (smoke tests)")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "sampling.json")
    parser.add_argument("--merge", action="store_true", help="add the measured families to the results file")
    parser.add_argument("--table", action="store_true", help="print the README table of the results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())))
        return
    names = [f for f in args.families.split(",") if f]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; valid: {list(FAMILIES)}")
    workers = tuple(int(w) for w in args.ray_workers.split(",") if w)
    torch.set_num_threads(1)
    init_ray(num_cpus=1 + sum(workers))
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, mujoco {mujoco.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "families": {},
    }
    for name in names:
        fam = FAMILIES[name]
        if args.tasks is not None:
            fam = Family(fam.env_id, args.tasks, fam.episodes, fam.horizon, fam.env_kwargs, fam.action_scale)
        record["families"][name] = measure(name, fam, args.repeats, workers)
        print(json.dumps({name: record["families"][name]}, indent=1), flush=True)
    if args.merge and args.results.exists():
        merged = json.loads(args.results.read_text())
        for name, fam in record["families"].items():
            stamp = {"date": record["date"], "repeats": args.repeats, "machine": record["machine"]}
            merged["families"][name] = {**fam, **stamp}
        record = merged
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
