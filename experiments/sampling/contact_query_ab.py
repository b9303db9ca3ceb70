"""A/B of the batched Meta-World step: the contact query in NumPy against Meta-World's own.

``MetaWorldBatch`` answers ``SawyerXYZEnv.touching_object`` from the contact arrays. This times the
batch with that answer against the same batch whose envs keep Meta-World's method (two batches of
the same envs and tasks, stepped alternately in blocks of 200 steps, one thread), for ML1 push-v3
(10 goals) and ML10's ten train classes. Usage::

    python experiments/sampling/contact_query_ab.py
"""

from __future__ import annotations

import time
import types

import numpy as np

from envs.metaworld_batch import MetaWorldBatch
from envs.metaworld_tasks import MetaWorldEnv

STEPS, BLOCK, HORIZON = 2000, 200, 500


def batch(kwargs: dict, tasks: list[dict], metaworld_query: bool) -> MetaWorldBatch:
    envs = [MetaWorldEnv(**kwargs) for _ in tasks]
    out = MetaWorldBatch(envs)
    out.set_tasks(tasks)
    out.reset(list(range(len(tasks))))
    if metaworld_query:  # an instance attribute: the batch leaves it as it is
        for env in envs:
            env._env.touching_object = types.MethodType(type(env._env).touching_object, env._env)
    return out


def main() -> None:
    ml10 = MetaWorldEnv(benchmark="ML10", split="train").env_names
    push = [{"env_name": "push-v3", "index": i} for i in range(10)]
    ten = [{"env_name": name, "index": i} for i, name in enumerate(ml10)]
    setups = {
        "push-v3": ({"benchmark": "ML1", "task_name": "push-v3"}, push),
        "ML10 train": ({"benchmark": "ML10", "split": "train"}, ten),
    }
    for label, (kwargs, tasks) in setups.items():
        batches = {"numpy": batch(kwargs, tasks, False), "metaworld": batch(kwargs, tasks, True)}
        actions = np.random.default_rng(0).uniform(-1, 1, (STEPS, len(tasks), 4))
        seconds = dict.fromkeys(batches, 0.0)
        for start in range(0, STEPS, BLOCK):
            for key, b in batches.items():
                t0 = time.perf_counter()
                for step in range(start, start + BLOCK):
                    if step % HORIZON == 0:
                        b.reset(list(range(len(tasks))))
                    b.step(actions[step])
                seconds[key] += time.perf_counter() - t0
        rates = {k: round(STEPS * len(tasks) / v) for k, v in seconds.items()}
        print(f"{label}: env steps/s {rates}, speed-up {seconds['metaworld'] / seconds['numpy']:.2f}x")


if __name__ == "__main__":
    main()
