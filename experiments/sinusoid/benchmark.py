"""Sinusoid benchmark: MAML against the pretrained baseline, and the batched inner loop's speed-up.

1. Trains ``maml.yaml`` and ``pretrain.yaml`` (K=10, as in the MAML paper), or the configs named
   by ``--methods`` (``metasgd``, ``mamlpp``, ``imaml``, ...), and evaluates each 5-shot on 600
   held-out tasks: MSE after 1 and 10 inner steps (each config's own inner loop).
   Paper (Finn et al. 2017): MAML 0.67 / 0.35; goal here: 0.8 / 0.45 or better.
2. Times meta-iterations of the same MAML update with the inner loop batched across tasks
   (``torch.func.vmap``) and with the per-task loop, interleaved in one process, for the sinusoid
   MLP (25 tasks) and the Omniglot conv net (8 tasks of 5-way 1-shot, random images; the batched
   learner uses the vmap-safe batch norm, as ``batched: true`` configs do).

Records each part with machine and date in ``experiments/results/sinusoid.json`` (a part not
re-run keeps its earlier record; each trained method as soon as it is evaluated). Usage::

    python experiments/sinusoid/benchmark.py [--out runs/sinusoid-bench] [--skip-training | --skip-timing]
        [--methods maml pretrain metasgd ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def train_and_evaluate(name: str, out: Path) -> dict:
    run_dir = out / name
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "metarl",
            "train",
            str(HERE / f"{name}.yaml"),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "threads=1",
        ],
        check=True,
        cwd=ROOT,
    )
    minutes = (time.time() - t0) / 60
    subprocess.run(
        [sys.executable, "-m", "metarl", "evaluate", str(run_dir), "--json", str(out / f"{name}.eval.json")],
        check=True,
        cwd=ROOT,
    )
    result = json.loads((out / f"{name}.eval.json").read_text())
    return {
        "config": f"experiments/sinusoid/{name}.yaml",
        "train_minutes": round(minutes, 1),
        "mse_by_step": [round(x, 4) for x in result["mean"]],
        "ci95_by_step": [round(x, 4) for x in result["ci95"]],
        "mse_1_step": round(result["mean"][1], 4),
        "mse_10_steps": round(result["mean"][10], 4),
        "num_tasks": result["num_tasks"],
    }


def time_batched_vs_loop(repeats: int = 5) -> dict:
    from agents.maml import MAML
    from agents.models import MLP, ConvNet
    from metarl.fewshot.batch import FewShotBatch
    from metarl.fewshot.objective import FewShotObjective
    from metarl.fewshot.sinusoid import SinusoidTasks

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cases = {
        "sinusoid_mlp_25_tasks": (
            lambda batched: MLP(1, [40, 40], 1),
            "regression",
            SinusoidTasks(k_shot=10, k_query=10).sample(25, rng),
            0.01,
            50,
        ),
        "omniglot_conv_8_tasks_5w1s": (
            lambda batched: ConvNet(n_way=5, vmap_safe_norm=batched),
            "classification",
            FewShotBatch(
                torch.rand(8, 5, 1, 28, 28),
                torch.arange(5).repeat(8, 1),
                torch.rand(8, 25, 1, 28, 28),
                torch.arange(5).repeat_interleave(5).repeat(8, 1),
            ),
            0.4,
            2,
        ),
    }
    out = {}
    for case, (make, kind, batch, lr, iters) in cases.items():
        learners = {}
        for batched in (True, False):
            torch.manual_seed(0)
            model = make(batched)
            learners[batched] = MAML(
                model, FewShotObjective(model, kind=kind), inner_lrs=[lr], outer_lr=1e-3, batched=batched
            )
            learners[batched].step(batch, 0)  # warm-up
        times = {True: [], False: []}
        for _ in range(repeats):  # interleaved so that machine noise hits both alike
            for batched, learner in learners.items():
                t0 = time.perf_counter()
                for it in range(iters):
                    learner.step(batch, it)
                times[batched].append((time.perf_counter() - t0) / iters)
        b, l = statistics.median(times[True]), statistics.median(times[False])
        out[case] = {
            "batched_s_per_iteration": round(b, 5),
            "loop_s_per_iteration": round(l, 5),
            "speedup_batched_over_loop": round(l / b, 2),
        }
        print(case, out[case], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sinusoid-bench")
    parser.add_argument("--skip-training", action="store_true", help="only the speed comparison")
    parser.add_argument("--skip-timing", action="store_true", help="only the training runs")
    parser.add_argument(
        "--methods", nargs="+", default=["maml", "pretrain"], help="configs of experiments/sinusoid/ to train"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "sinusoid.json")
    args = parser.parse_args()
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    stamp = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    unknown = [m for m in args.methods if not (HERE / f"{m}.yaml").exists()]
    if unknown:
        parser.error(f"--methods {' '.join(unknown)}: no such config in experiments/sinusoid/")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_timing:
        record["batched_inner_loop"] = {**stamp, **time_batched_vs_loop()}
    if not args.skip_training:
        args.out.mkdir(parents=True, exist_ok=True)
        regression = record.setdefault("regression", {})
        record["paper"] = {"maml": {"mse_1_step": 0.67, "mse_10_steps": 0.35}, "pretrained": {"mse_1_step": 2.41}}
        record["goal"] = {"maml": {"mse_1_step": 0.8, "mse_10_steps": 0.45}}
        for name in args.methods:  # each method's record carries its own machine and date, written as it finishes
            regression[name] = {**train_and_evaluate(name, args.out), **stamp}
            args.results.write_text(json.dumps(record, indent=2) + "\n")
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
