"""MAML-TRPO on every task family: an hour of training each, then `metarl evaluate --baselines`.

For a family (the name of its folder under ``experiments/``, e.g. ``halfcheetah_vel``):

1. ``train``: ``experiments/rl/benchmark.py <family>/maml_trpo --minutes M --tag hour --no-eval``
   with ``threads=1 ray.workers=0`` (one core: two families run side by side on this 2-core
   machine). Resumable: a stopped run continues from its checkpoint, the minutes add up.
2. ``evaluate``: ``metarl evaluate RUN --baselines`` with :data:`PROTOCOL` (40 held-out tasks,
   returns after 0..3 adaptation steps against a random init, a multi-task PPO policy, PPO from
   scratch and PPO oracles).
3. ``record``: ``experiments/results/<family>_baselines.json`` (the evaluation JSON plus the
   run's iterations, env steps, training minutes, machine and date), ``<family>_baselines.png``,
   ``<family>_curves.png`` (``metarl plot``: return before and after adaptation), and the run
   itself under ``experiments/results/runs/<family>/`` (config, metrics, last checkpoint, evaluation), so
   ``metarl adapt`` and ``metarl evaluate`` work on it from a fresh clone.

``table`` prints the README's table of every recorded family.

Usage::

    python experiments/rl/families.py all halfcheetah_dir [--minutes 60] [--out /work/rl-bench]
    python experiments/rl/families.py evaluate halfcheetah_dir --run-dir DIR
    python experiments/rl/families.py table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "experiments" / "results"
#: The comparison's budget, the same for every family. Its PPO jobs take most of its time: about 57 minutes
#: of wall time for HalfCheetahVel with --jobs 2 while another evaluation shared the 2 cores.
PROTOCOL = [
    "--num-tasks",
    "40",
    "--steps",
    "3",
    "--pretrain-steps",
    "500000",
    "--oracle-steps",
    "100000",
    "--oracle-tasks",
    "5",
    "--jobs",
    "2",
]
TRAIN_OVERRIDES = ["threads=1", "ray.workers=0"]
METHODS = {
    "meta": "MAML-TRPO",
    "random_init": "random init",
    "pretrained": "multi-task PPO",
    "ppo_scratch": "PPO from scratch",
    "oracle": "PPO oracle",
}


def run_dir_of(out: Path, family: str) -> Path:
    return out / f"{family}-maml_trpo-hour"


def train_config(config: str, out: Path, minutes: float, overrides: list[str]) -> None:
    """``benchmark.py CONFIG --minutes M --tag hour --no-eval`` on one core (resumable)."""
    cmd = [sys.executable, str(HERE / "benchmark.py"), config, "--minutes", str(minutes)]
    cmd += ["--tag", "hour", "--no-eval", "--out", str(out), *TRAIN_OVERRIDES, *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_figures(run_dir: Path) -> dict:
    """Iterations, env steps, training minutes and median seconds per iteration of a run, with
    the overrides it trained with, the machine and the date."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = sorted(r["time/iteration"] for r in rows)
    return {
        "train_overrides": TRAIN_OVERRIDES,
        "iterations": len(rows),
        "env_steps": rows[-1]["env_steps"],
        "train_minutes": round(sum(seconds) / 60, 1),
        "seconds_per_iteration_median": round(seconds[len(seconds) // 2], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def evaluate(family: str, run_dir: Path) -> None:
    t0 = time.time()
    cmd = [sys.executable, "-m", "metarl", "evaluate", str(run_dir), "--baselines", *PROTOCOL]
    subprocess.run(cmd, cwd=ROOT, check=True)
    result = json.loads((run_dir / "eval_baselines.json").read_text())
    result.update(
        family=family,
        config=f"experiments/{family}/maml_trpo.yaml",
        run=f"experiments/results/runs/{family}",
        command="metarl evaluate RUN --baselines " + " ".join(PROTOCOL),
        evaluate_minutes=round((time.time() - t0) / 60, 1),
        **run_figures(run_dir),
    )
    (RESULTS / f"{family}_baselines.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.copyfile(run_dir / "eval_baselines.png", RESULTS / f"{family}_baselines.png")
    plot = [sys.executable, "-m", "metarl", "plot", str(run_dir), "--out", str(RESULTS / f"{family}_curves.png")]
    subprocess.run([*plot, "--smooth", "5"], cwd=ROOT, check=True)
    keep = RESULTS / "runs" / family
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "eval_baselines.json"):
        shutil.copyfile(run_dir / name, keep / name)
    print(f"recorded {RESULTS / f'{family}_baselines.json'} and {keep}")


def table() -> str:
    """The README table: family, iterations, env steps, return after 0 -> 1 steps per method."""
    head = "| family | iterations | env steps | " + " | ".join(METHODS.values()) + " |"
    lines = [head, "|" + " --- |" * (3 + len(METHODS))]
    for path in sorted(RESULTS.glob("*_baselines.json")):
        r = json.loads(path.read_text())
        if "family" not in r:  # recorded before this script
            continue
        cells = []
        for key in METHODS:
            m = r["methods"].get(key)
            if m is None:
                cells.append("")
            elif key == "oracle":
                cells.append(f"{m['mean'][0]:.1f} ± {m['ci95'][0]:.1f} ({m['num_tasks']} tasks)")
            else:
                cells.append(f"{m['mean'][0]:.1f} → {m['mean'][1]:.1f} ± {m['ci95'][1]:.1f}")
        row = [f"`{r['family']}`", str(r["iterations"]), f"{r['env_steps'] / 1e6:.1f}M", *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["all", "train", "evaluate", "table"])
    parser.add_argument("family", nargs="?", help="a folder of experiments/ with a maml_trpo.yaml")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-bench")
    parser.add_argument("--run-dir", type=Path, help="evaluate: the run (default: the train step's)")
    args, overrides = parser.parse_known_args()
    if args.what == "table":
        print(table())
        return
    if args.family is None or not (ROOT / "experiments" / args.family / "maml_trpo.yaml").is_file():
        parser.error(f"family: need a folder of experiments/ with a maml_trpo.yaml, got {args.family!r}")
    run_dir = args.run_dir or run_dir_of(args.out, args.family)
    if args.what in ("all", "train"):
        train_config(f"{args.family}/maml_trpo", args.out, args.minutes, overrides)
    if args.what in ("all", "evaluate"):
        evaluate(args.family, run_dir)


if __name__ == "__main__":
    main()
