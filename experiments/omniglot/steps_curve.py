"""Accuracy of a trained run by inner step, past the steps its config scores it after.

Asks whether a method that falls short would do better with more (or fewer) adaptation steps,
on validation tasks so the answer can choose a step count without touching the test split (the
test split's curve is ``metarl evaluate RUN --steps N``). Prints the mean accuracy after the listed
steps and the 95% CI after the last. Usage::

    python experiments/omniglot/steps_curve.py [--tasks 100] [--steps 30] RUN_DIR ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from metarl.core.config import ConfigError
from metarl.fewshot.omniglot import OmniglotDataNotFound
from metarl.runs.experiment import VAL, mean_and_ci95, split_rng
from metarl.runs.load import load_experiment_config, restore
from metarl.runs.rundir import RunError

SEED = 777  # the validation tasks' seed: the same tasks for every run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shown = [s for s in (1, 3, 5, 10, 15, 20, 30, 50) if s <= args.steps]
    for run in args.runs:
        cfg = load_experiment_config(run / "config.yaml", [])
        experiment, _ = restore(cfg, run)
        curves = experiment.curves("val", args.tasks, split_rng(SEED, VAL), args.steps)["accuracy"]
        if curves.shape[1] == 1:
            print(f"{run.name}: {cfg.algorithm} adapts without inner steps; nothing to compare by step")
            continue
        summary = mean_and_ci95(curves)
        by_step = ", ".join(f"{s}: {summary['mean'][s]:.3f}" for s in shown)
        print(f"{run.name}: {by_step} (± {summary['ci95'][args.steps]:.3f} after {args.steps})")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, RunError, OmniglotDataNotFound) as exc:  # bad run directory or data: one line, status 2
        print(f"steps_curve.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
