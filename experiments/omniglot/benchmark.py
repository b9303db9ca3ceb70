"""Omniglot benchmark: train every experiments/omniglot/*.yaml and evaluate it on held-out characters.

Runs ``metarl train`` then ``metarl evaluate`` for each config, ``--parallel`` runs at a time
(each config sets ``threads: 1``), and records training wall time and held-out accuracy (mean
and 95% CI over 600 tasks, after the last evaluated inner step) in
``experiments/results/omniglot.json``: each run's row, with the machine and date, as soon as it
is evaluated. Usage::

    python experiments/omniglot/benchmark.py [--out runs/omniglot-bench] [--parallel 2] [--minutes 30] [NAME ...]
    python experiments/omniglot/benchmark.py --table      # the README's table, the papers' figures beside

With ``--minutes M`` a training run still going after M minutes is stopped (SIGTERM, which
``metarl train`` treats like Ctrl-C) and its last checkpoint is evaluated; the record then
says how many iterations fitted in the budget.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: Issue targets: 5-way 1-shot and 20-way 1-shot on held-out characters, 20-way 1-shot on unseen alphabets.
TARGETS = {"5w1s": 0.95, "20w1s": 0.85, "20w1s_alphabets": 0.90}
#: The table's columns: the settings of experiments/omniglot/<method>_<setting>.yaml.
SETTINGS = ["5w1s", "5w5s", "20w1s", "20w5s", "20w1s_alphabets"]
METHODS = ["maml", "fomaml", "reptile", "protonet", "matchingnet", "relationnet", "siamese"]
METHODS += ["metasgd", "metalstm", "mamlpp", "anil", "imaml", "r2d2"]
#: Each method's own paper (full Omniglot, 1,200 training characters; 5w1s, 5w5s, 20w1s, 20w5s, %):
#: MAML Table 1; first-order MAML and Reptile (non-transductive, arXiv v3) from Nichol et al. 2018,
#: Table 2; ProtoNets Table 1; Matching Networks Table 1 (cosine, no fine-tuning); Relation Networks
#: Table 1; the convolutional Siamese net as Vinyals et al. 2016 report it (Table 1); Meta-SGD Table 2;
#: MAML++ (Antoniou et al. 2019; its 5w5s figure is quoted two ways, so left out); ANIL Table 2 (20-way
#: only); iMAML Table 2 ("iMAML, GD", the variant built here). None: not reported (the Meta-Learner
#: LSTM reports miniImageNet only) or not checked here (R2-D2).
PUBLISHED = {
    "maml": (98.7, 99.9, 95.8, 98.9),
    "fomaml": (98.3, 99.2, 89.4, 97.9),
    "reptile": (95.39, 98.90, 88.14, 96.65),
    "protonet": (98.8, 99.7, 96.0, 98.9),
    "matchingnet": (98.1, 98.9, 93.8, 98.5),
    "relationnet": (99.6, 99.8, 97.6, 99.1),
    "siamese": (96.7, 98.4, 88.0, 96.5),
    "metasgd": (99.53, 99.93, 95.93, 98.97),
    "mamlpp": (99.47, None, 97.65, 99.33),
    "anil": (None, None, 96.2, 98.0),
    "imaml": (99.16, 99.67, 94.46, 98.69),
}


def run_one(name: str, out: Path, minutes: float | None = None) -> dict:
    run_dir = out / name
    log = (out / f"{name}.log").open("w")
    t0 = time.time()
    stopped = False
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metarl",
            "train",
            str(HERE / f"{name}.yaml"),
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        code = train.wait(timeout=None if minutes is None else minutes * 60)
    except subprocess.TimeoutExpired:
        train.send_signal(signal.SIGTERM)
        code, stopped = train.wait(), True
        if code not in (0, 130):
            raise RuntimeError(
                f"{name}: training stopped at the time budget exited with {code}; see {log.name}"
            ) from None
    else:
        if code != 0:
            raise RuntimeError(f"{name}: training failed with exit status {code}; see {log.name}")
    train_s = time.time() - t0
    subprocess.run(
        [sys.executable, "-m", "metarl", "evaluate", str(run_dir), "--json", str(out / f"{name}.eval.json")],
        check=True,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    result = json.loads((out / f"{name}.eval.json").read_text())
    setting = name.split("_", 1)[1]  # 5w1s, 20w5s, 20w1s_alphabets
    row = {
        "config": f"experiments/omniglot/{name}.yaml",
        "train_minutes": round(train_s / 60, 1),
        "iterations": result["iteration"],
        "steps": result["steps"][-1],
        "accuracy": round(result["mean"][-1], 4),
        "ci95": round(result["ci95"][-1], 4),
        "accuracy_by_step": [round(x, 4) for x in result["mean"]],
        "num_tasks": result["num_tasks"],
        "target": TARGETS.get(setting),
    }
    if stopped:
        row["stopped_at_budget"] = f"stopped after {minutes} minutes; the last checkpoint was evaluated"
    print(json.dumps({name: row}), flush=True)
    return row


def _percent(fraction: float) -> str:
    """0.9535 -> "95.4": the recorded 4-decimal fraction as a percentage rounded half up (binary
    floats would print 95.35 as 95.3)."""
    return f"{math.floor(fraction * 1000 + 0.5 + 1e-9) / 10:.1f}"


def table(results: dict) -> str:
    """The README's Omniglot table: per method, accuracy (95% CI) of each recorded setting with the
    paper's figure on full Omniglot in brackets; a figure under the issue's target is marked."""
    columns = ["method", "5-way 1-shot", "5-way 5-shot", "20-way 1-shot", "20-way 5-shot"]
    columns += ["20-way 1-shot, unseen alphabets", "training (min, 1-shot 5 / 20-way)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for method in METHODS:
        cells, minutes = [], []
        for i, setting in enumerate(SETTINGS):
            r = results.get(f"{method}_{setting}")
            paper = PUBLISHED.get(method, (None,) * 4)[i] if i < 4 else None
            cell = "-" if r is None else f"{_percent(r['accuracy'])} ± {_percent(r['ci95'])}"
            if r is not None and r.get("target") is not None:
                cell = f"**{cell}**" if r["accuracy"] >= r["target"] else f"{cell} (under {100 * r['target']:.0f})"
            cells.append(cell if paper is None else f"{cell} ({paper})")
            if setting in ("5w1s", "20w1s"):
                minutes.append("-" if r is None else f"{r['train_minutes']:g}")
        lines.append("| " + " | ".join([method, *cells, " / ".join(minutes)]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="config names (default: every YAML here)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "omniglot-bench")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=None, help="stop each training run after this many minutes")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "omniglot.json")
    parser.add_argument("--table", action="store_true", help="print the README's table of the recorded results")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())["results"]))
        return
    names = args.names or sorted(p.stem for p in HERE.glob("*.yaml"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "parallel_runs": args.parallel,
    }

    def run_and_record(name: str) -> dict:
        """Train and evaluate one config and record its row at once, with its machine and date (a
        stopped benchmark keeps the rows it finished)."""
        row = {**run_one(name, args.out, args.minutes), **record}
        with open(args.results.with_suffix(".lock"), "w") as lock:  # two benchmarks may finish together
            fcntl.flock(lock, fcntl.LOCK_EX)
            previous = json.loads(args.results.read_text()) if args.results.exists() else {"results": {}}
            previous["results"][name] = row
            args.results.write_text(json.dumps(previous, indent=2) + "\n")
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = dict(zip(names, pool.map(run_and_record, names)))
    print(f"{'config':<16} {'minutes':>7} {'iters':>6} {'accuracy':>9} {'ci95':>7} {'target':>7}")
    for name, r in rows.items():
        print(
            f"{name:<16} {r['train_minutes']:>7} {r['iterations']:>6} {r['accuracy']:>9.4f} {r['ci95']:>7.4f} "
            f"{r['target']!s:>7}"
        )


if __name__ == "__main__":
    main()
