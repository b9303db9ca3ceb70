"""Where a MAML-TRPO meta-update spends its time, at a config's shape, on 1 and 2 learner threads.

Samples one meta-batch with the config's sampler (untimed), then times, with the policy restored
between repeats so every repeat does the same work:

- ``gradient``: the surrogate and its gradient through the inner loop (second order);
- ``fvp_setup``: building the Fisher-vector product's graphs (:meth:`MAMLTRPO.fisher_vector_product`);
- ``fvp``: one Fisher-vector product (the conjugate gradient makes ``cg_iterations`` of them, the
  step size one more);
- ``line_search_candidate``: re-adapting and evaluating one candidate step;
- ``meta_update``: the learner's whole ``step`` (what the training log calls ``time/meta_update``).

Medians of ``--repeats`` interleaved repeats. Usage::

    python experiments/rl/meta_update.py experiments/halfcheetah_vel/maml_trpo.yaml [--threads 1,2] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from metarl.core.config_files import load_config
from metarl.core.trpo import conjugate_gradient, flatten
from metarl.runs.experiment import TRAIN
from metarl.runs.rl import RLExperiment
from metarl.runs.rl_config import RLConfig


def clock(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def phases(exp: RLExperiment, batch) -> dict[str, float]:
    learner = exp.learner
    train, valid, adapted = batch
    theta0 = learner.theta()
    with torch.no_grad():
        old = tuple(o.detach() for o in learner.policy.outputs(valid.episodes.observations, adapted))

    def gradient():
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        surrogate, _ = learner.surrogate_and_kl(theta, train, valid, old)
        return flatten(dict(zip(theta, torch.autograd.grad(surrogate, list(theta.values()))))).detach()

    out: dict[str, float] = {}
    out["gradient"], g = clock(gradient)
    out["fvp_setup"], fvp = clock(lambda: learner.fisher_vector_product(theta0, train, valid))
    out["fvp"], _ = clock(lambda: fvp(g))
    out["conjugate_gradient"], direction = clock(lambda: conjugate_gradient(fvp, g, iterations=learner.cg_iterations))
    step = -1e-3 * direction
    out["line_search_candidate"], _ = clock(
        lambda: learner.surrogate_and_kl(
            {
                k: theta0[k] + v.view_as(theta0[k])
                for k, v in zip(theta0, step.split([p.numel() for p in theta0.values()]))
            },
            train,
            valid,
            old,
        )
    )
    saved = copy.deepcopy(learner.policy.state_dict())
    out["meta_update"], _ = clock(lambda: learner.step(batch, 0))
    learner.policy.load_state_dict(saved)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the result here")
    args, overrides = parser.parse_known_args()
    cfg = load_config(RLConfig, args.config, ["ray.workers=0", *overrides])
    with torch.no_grad():
        exp = RLExperiment(cfg)
    tasks = exp.sample_tasks(TRAIN, 0, cfg.meta_batch_size)
    t_sample, (batch, _) = clock(lambda: exp.adapt_and_sample(tasks, (TRAIN, 0), cfg.inner.steps))
    steps = sum(d.episodes.num_steps() for d in batch.train) + batch.valid.episodes.num_steps()
    print(f"sampled {steps} env steps in {t_sample:.1f} s", flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    times: dict[int, dict[str, list[float]]] = {t: {} for t in threads}
    for r in range(args.repeats):
        for t in threads:
            torch.set_num_threads(t)
            for k, v in phases(exp, batch).items():
                times[t].setdefault(k, []).append(v)
            print(
                f"repeat {r} threads {t}: " + json.dumps({k: round(v[-1], 3) for k, v in times[t].items()}), flush=True
            )
    record = {
        "config": str(args.config),
        "overrides": overrides,
        "env_steps_per_iteration": steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds_median": {
            f"threads_{t}": {k: round(statistics.median(v), 3) for k, v in times[t].items()} for t in threads
        },
    }
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    exp.close()


if __name__ == "__main__":
    main()
