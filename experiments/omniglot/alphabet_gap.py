"""Where the unseen-alphabet accuracy goes: within-alphabet tasks against mixed-alphabet tasks.

A run trained on the alphabet split (``experiments/omniglot/<method>_20w1s_alphabets.yaml``) is
scored twice on the same held-out alphabets: with each task's classes drawn from one alphabet at
one rotation (``omniglot.within_alphabet: true``, the benchmark's protocol) and with them drawn
across the held-out alphabets (``false``). The first gap is what look-alike characters cost; the
rest, down from the character split's figure, is what unseen alphabets cost. Records go to
``experiments/results/omniglot_alphabet_gap.json`` (mean and 95% CI over the tasks, after the
config's evaluation steps). Usage::

    python experiments/omniglot/alphabet_gap.py [--runs runs/omniglot-bench] [--tasks 200] NAME ...
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from metarl.core.config import ConfigError
from metarl.fewshot.omniglot import OmniglotDataNotFound
from metarl.runs.experiment import TEST, mean_and_ci95, split_rng
from metarl.runs.load import load_experiment_config, restore
from metarl.runs.rundir import RunError

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results" / "omniglot_alphabet_gap.json"
SEED = 12345  # the test tasks' seed: the same tasks for both protocols and every run


def accuracy(run_dir: Path, within_alphabet: bool, num_tasks: int) -> tuple[float, float]:
    """Mean and 95% CI of the query accuracy after the config's ``eval.steps``."""
    cfg = load_experiment_config(run_dir / "config.yaml", [f"omniglot.within_alphabet={str(within_alphabet).lower()}"])
    experiment, _ = restore(cfg, run_dir)
    curves = experiment.curves("test", num_tasks, split_rng(SEED, TEST), cfg.eval.steps)["accuracy"]
    summary = mean_and_ci95(curves[:, -1:])
    return summary["mean"][0], summary["ci95"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", help="run names under --runs, e.g. maml_20w1s_alphabets")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "omniglot-bench")
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.names:
        start = time.perf_counter()
        within, within_ci = accuracy(args.runs / name, True, args.tasks)
        mixed, mixed_ci = accuracy(args.runs / name, False, args.tasks)
        records[name] = {
            "within_alphabet": within,
            "within_alphabet_ci95": within_ci,
            "mixed_alphabets": mixed,
            "mixed_alphabets_ci95": mixed_ci,
            "num_tasks": args.tasks,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} thread",
            "date": time.strftime("%Y-%m-%d"),
        }
        seconds = time.perf_counter() - start
        print(f"{name}: within one alphabet {within:.3f} ± {within_ci:.3f}", end=", ")
        print(f"across alphabets {mixed:.3f} ± {mixed_ci:.3f} ({seconds:.0f} s)", flush=True)
        RESULTS.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, RunError, OmniglotDataNotFound) as exc:  # bad run directory or data: one line, status 2
        print(f"alphabet_gap.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
