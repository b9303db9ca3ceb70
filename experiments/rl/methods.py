"""RL^2, ProMP and MAML-TRPO side by side: timed training, then each run's own evaluation.

For a config ``<folder>/<algorithm>`` of ``experiments/`` (e.g. ``metaworld_ml1_reach/rl2``):

1. ``train``: ``experiments/rl/benchmark.py CONFIG --minutes M --tag hour --no-eval`` with
   ``threads=1 ray.workers=0`` (one core: two runs side by side on this 2-core machine).
   Resumable: a stopped run continues from its checkpoint and the minutes add up.
2. ``evaluate``:

   - Meta-World runs: ``metarl evaluate RUN --metaworld`` (Meta-World's own
     ``metalearning_evaluation``, meta-train and meta-test success rates over 10 rounds), recorded
     under the config's name in ``experiments/results/metaworld.json`` with the env steps, the
     training and evaluation wall time, the machine and the date;
   - the other families: ``metarl evaluate RUN --num-tasks 40 --steps 3`` (the held-out tasks of
     ``families.py``'s protocol: same count, same seed), recorded as
     ``experiments/results/<folder>_<algorithm>_eval.json``.

   Either way the run itself goes to ``experiments/results/runs/<folder>_<algorithm>/`` (config,
   metrics, last checkpoint, evaluation), so ``metarl adapt`` and ``metarl plot`` work on it
   from a fresh clone.
3. ``plot FOLDER``: ``metarl plot --evaluations --baselines`` of the recorded MAML-TRPO run (with
   its baselines) and every recorded RL^2 and ProMP run of the folder, return against episodes
   of experience on a new task, into ``experiments/results/<folder>_methods.png``.

``table`` prints the README's Meta-World table next to the Meta-World paper's figures.

Usage::

    python experiments/rl/methods.py all metaworld_ml1_reach/rl2 [--minutes 60] [--out /work/rl-bench]
    python experiments/rl/methods.py evaluate navigation2d/promp [--run-dir DIR]
    python experiments/rl/methods.py plot navigation2d      # + curves by env steps (log axis)
    python experiments/rl/methods.py table
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from families import run_figures, train_config  # the same timed training and run figures as every family

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "experiments" / "results"
METAWORLD = RESULTS / "metaworld.json"
#: Held-out tasks of the non-Meta-World evaluations: those of ``families.py``'s protocol.
HELD_OUT = ["--num-tasks", "40", "--steps", "3"]
#: Yu et al. (2019), Meta-World, Table 1: meta-train / meta-test success rate (%), with the env
#: steps of their runs (Section 5 and Figure 6 of the paper: up to 1e8 for ML10 and ML45).
PUBLISHED = {
    ("ML10", "maml_trpo"): (44.4, 31.6),
    ("ML10", "rl2"): (86.9, 35.8),
    ("ML10", "pearl"): (23.2, 13.0),
    ("ML45", "maml_trpo"): (40.7, 39.9),
    ("ML45", "rl2"): (70.0, 33.3),
    ("ML45", "pearl"): (14.5, 22.0),
}


def run_dir_of(out: Path, config: str) -> Path:
    return out / f"{config.replace('/', '-')}-hour"


def keep_run(run_dir: Path, name: str, evaluation: str) -> Path:
    """Copy a run's config, metrics, checkpoint and evaluation into ``experiments/results/runs/NAME``.
    A PEARL checkpoint is kept without its replay buffers (95 MB for an hour of HalfCheetahVel): the
    networks are complete, so ``metarl evaluate`` and ``metarl adapt`` work on the copy."""
    import torch

    keep = RESULTS / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    for file in ("config.yaml", "metrics.jsonl", "checkpoint.pt", evaluation):
        if (run_dir / file).resolve() != (keep / file).resolve():
            shutil.copyfile(run_dir / file, keep / file)
    state = torch.load(keep / "checkpoint.pt", weights_only=True)
    if "replay" in state:
        del state["replay"]
        torch.save(state, keep / "checkpoint.pt")
    return keep


def evaluate(config: str, run_dir: Path, metaworld_args: list[str]) -> None:
    folder, algorithm = config.split("/")
    name = f"{folder}_{algorithm}"
    t0 = time.time()
    if folder.startswith("metaworld"):
        cmd = [sys.executable, "-m", "metarl", "evaluate", str(run_dir), "--metaworld", *metaworld_args]
        subprocess.run(cmd, cwd=ROOT, check=True)
        result = json.loads((run_dir / "eval_metaworld.json").read_text())
        evaluation = "eval_metaworld.json"
        command = "metarl evaluate RUN --metaworld " + " ".join(metaworld_args)
    else:
        cmd = [sys.executable, "-m", "metarl", "evaluate", str(run_dir), *HELD_OUT]
        subprocess.run(cmd, cwd=ROOT, check=True)
        result = json.loads((run_dir / "eval.json").read_text())
        evaluation = "eval.json"
        command = "metarl evaluate RUN " + " ".join(HELD_OUT)
    result.update(
        config=f"experiments/{config}.yaml",
        run=f"experiments/results/runs/{name}",
        command=command.strip(),
        evaluate_minutes=round((time.time() - t0) / 60, 1),
        **run_figures(run_dir),
    )
    if folder.startswith("metaworld"):
        recorded = json.loads(METAWORLD.read_text()) if METAWORLD.is_file() else {}
        recorded[config] = result
        METAWORLD.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
        where = METAWORLD
    else:
        where = RESULTS / f"{name}_eval.json"
        where.write_text(json.dumps(result, indent=2) + "\n")
    keep = keep_run(run_dir, name, evaluation)
    print(f"recorded {where} and {keep}")


def plot(folder: str) -> None:
    """MAML-TRPO (with its baselines), RL^2 and ProMP of a family in one plot by episodes of experience."""
    others = [p for p in (RESULTS / "runs").glob(f"{folder}_*") if (p / "eval.json").is_file()]
    runs = [RESULTS / "runs" / folder, *sorted(others)]
    out = RESULTS / f"{folder}_methods.png"
    cmd = [sys.executable, "-m", "metarl", "plot", *map(str, runs), "--evaluations", "--baselines", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def curves_by_env_steps(folder: str) -> None:
    """Training curves of every recorded run of a family by the env steps they learned from, on a
    log axis (PEARL's data and MAML-TRPO's differ by orders of magnitude): return after adaptation
    (MAML-type: one inner step; RL^2 and PEARL: with the trial's or the posterior's context)."""
    runs = [p for p in [RESULTS / "runs" / folder, *sorted((RESULTS / "runs").glob(f"{folder}_*"))] if p.is_dir()]
    out = RESULTS / f"{folder}_env_steps.png"
    cmd = [sys.executable, "-m", "metarl", "plot", *map(str, runs), "--x", "env_steps", "--log-x",
           "--keys", "return/post_adapt", "--smooth", "5", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)


def table() -> str:
    """The README's Meta-World table: one row per recorded run, the paper's figures beside."""
    columns = ["benchmark", "task", "algorithm", "env steps", "train h", "meta-train success", "meta-test success"]
    columns += ["Metaworld 3.0's count (train / test)", "Yu et al. 2019 (train / test)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    recorded = json.loads(METAWORLD.read_text()) if METAWORLD.is_file() else {}
    for config, r in sorted(recorded.items()):
        folder, algorithm = config.split("/")
        benchmark = "ML10" if folder == "metaworld_ml10" else "ML1"
        task = "10 train / 5 test classes" if benchmark == "ML10" else folder.removeprefix("metaworld_ml1_") + "-v3"
        cells, first = [], []
        for split in ("train", "test"):
            s = r["splits"][split]
            if "metaworld_3_0" in s:  # every sub-env's episodes, and Metaworld 3.0's first-per-class count
                cells.append(f"{100 * s['mean'][0]:.1f} ± {100 * s['ci95'][0]:.1f}%")
                first.append(f"{100 * s['metaworld_3_0']['mean'][0]:.1f}")
            else:  # recorded before every sub-env was counted: its figure is Metaworld 3.0's count
                cells.append("not measured")
                first.append(f"{100 * s['mean'][0]:.1f}")
        paper = PUBLISHED.get((benchmark, algorithm))
        row = [benchmark, task, algorithm, f"{r['env_steps'] / 1e6:.1f}M", f"{r['train_minutes'] / 60:.1f}", *cells]
        row.append(" / ".join(first) + "%")
        row.append(f"{paper[0]} / {paper[1]}" if paper else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["all", "train", "evaluate", "plot", "table"])
    parser.add_argument("config", nargs="?", help="FOLDER/ALGORITHM of experiments/ (plot: FOLDER)")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-bench")
    parser.add_argument("--run-dir", type=Path, help="evaluate: the run (default: the train step's)")
    parser.add_argument("--num-evals", type=int, default=10, help="Meta-World: rounds of its protocol (default 10)")
    args, overrides = parser.parse_known_args()
    if args.what == "table":
        print(table())
        return
    if args.what == "plot":
        if args.config is None or not (RESULTS / "runs" / args.config / "eval_baselines.json").is_file():
            parser.error(f"plot: need a family recorded by families.py (with eval_baselines.json), got {args.config!r}")
        plot(args.config)
        curves_by_env_steps(args.config)
        return
    if args.config is None or not (ROOT / "experiments" / f"{args.config}.yaml").is_file():
        parser.error(f"config: need FOLDER/ALGORITHM with an experiments/FOLDER/ALGORITHM.yaml, got {args.config!r}")
    run_dir = args.run_dir or run_dir_of(args.out, args.config)
    if args.what in ("all", "train"):
        train_config(args.config, args.out, args.minutes, overrides)
    if args.what in ("all", "evaluate"):
        evaluate(args.config, run_dir, ["--num-evals", str(args.num_evals)])


if __name__ == "__main__":
    main()
