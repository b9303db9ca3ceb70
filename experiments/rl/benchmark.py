"""Meta-RL benchmark: train experiment configs, evaluate them, record speed and learning figures.

For each config (e.g. ``navigation2d/maml_trpo``) this runs ``metarl train`` (unless the run
directory already holds a finished run: then it only summarises it), then ``metarl evaluate``
on held-out tasks, and records in ``experiments/results/rl.json`` (with the machine and date):

- speed: median seconds per meta-iteration and its breakdown (sampling, adaptation,
  meta-update), env steps per second of the sampler;
- learning: the return before and after adaptation at the start, averaged over iterations
  51-60 (the reference point of pytorch-maml-rl's Navigation2D run) and over the last 10
  iterations, and the held-out evaluation (return after 0..3 adaptation steps, 95% CI);
- the learning curve (pre/post-adaptation return per iteration).

Usage::

    python experiments/rl/benchmark.py navigation2d/maml_trpo [halfcheetah_vel/maml_trpo ...] \\
        [--out runs/rl-bench] [--minutes M] [--tag T] [--no-eval] [key=value ...]

``--minutes M`` stops training (SIGTERM: ``metarl train`` ends the current iteration and writes
a checkpoint of every iteration done) once the run's training time passes M minutes, for "as
many iterations as fit in an hour". The training time is the sum of the logged
``time/iteration`` of a resumed run plus this invocation's wall time, so an hour-long run may be
split over several invocations (a stopped run resumes where its checkpoint left off, with the
same result as an uninterrupted one). Overrides apply to every config, and to a resumed run too:
``num_iterations=N`` extends a finished run to N iterations within the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "experiments" / "results" / "rl.json"


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(name: str, run_dir: Path, overrides: list[str], minutes: float | None, log) -> float:
    """Train (or resume) the run; returns its total training time in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "metarl",
        "train",
        str(ROOT / "experiments" / f"{name}.yaml"),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *overrides,
    ]
    spent = 0.0
    if (run_dir / "config.yaml").exists():
        cmd = [sys.executable, "-m", "metarl", "train", "--resume", "--run-dir", str(run_dir), "--no-progress"]
        cmd += overrides  # e.g. num_iterations=N extends a finished run
        spent = sum(r["time/iteration"] for r in read_rows(run_dir))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        time.sleep(5)
        if minutes is not None and spent + time.time() - t0 > minutes * 60:
            proc.send_signal(signal.SIGTERM)  # metarl train stops after this iteration, checkpoint written
            proc.wait()
            break
    if proc.returncode not in (0, 130, None):
        raise RuntimeError(f"{name}: metarl train failed (exit {proc.returncode}); see the log")
    return spent + time.time() - t0


def summarize(name: str, run_dir: Path, eval_json: Path | None, train_s: float | None) -> dict:
    rows = read_rows(run_dir)
    if not rows:
        raise RuntimeError(f"{run_dir} has no metrics")

    def mean(key: str, lo: int, hi: int) -> float | None:
        values = [r[key] for r in rows if lo <= r["iteration"] <= hi and key in r]
        return round(statistics.fmean(values), 2) if values else None

    last = rows[-1]["iteration"]
    out = {
        "config": f"experiments/{name}.yaml",
        "iterations": len(rows),
        "train_minutes": round(train_s / 60, 1) if train_s else None,
        "seconds_per_iteration_median": round(statistics.median(r["time/iteration"] for r in rows), 3),
        "breakdown_median_s": {  # the phases a run logs (PEARL has no adaptation phase)
            k: round(statistics.median(r[f"time/{k}"] for r in rows), 3)
            for k in ("sampling", "adaptation", "meta_update")
            if all(f"time/{k}" in r for r in rows)
        },
        "env_steps_per_s_median": round(statistics.median(r["env_steps_per_s"] for r in rows)),
        "env_steps": rows[-1]["env_steps"],
        "return_first_iteration": {
            "pre": round(rows[0]["return/pre_adapt"], 2),
            "post": round(rows[0]["return/post_adapt"], 2),
        },
        "return_iterations_51_60": {"pre": mean("return/pre_adapt", 51, 60), "post": mean("return/post_adapt", 51, 60)},
        "return_last_10": {
            "pre": mean("return/pre_adapt", last - 9, last),
            "post": mean("return/post_adapt", last - 9, last),
        },
        "curve": {
            "pre": [round(r["return/pre_adapt"], 2) for r in rows],
            "post": [round(r["return/post_adapt"], 2) for r in rows],
        },
    }
    if eval_json is not None and eval_json.exists():
        ev = json.loads(eval_json.read_text())
        out["evaluation"] = {k: ev[k] for k in ("steps", "mean", "ci95", "num_tasks", "iteration") if k in ev}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="configs under experiments/, e.g. navigation2d/maml_trpo")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-bench")
    parser.add_argument("--minutes", type=float, help="stop training after this many minutes")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--tag", default="", help="record under NAME@TAG (e.g. a speed run with other threads)")
    args, overrides = parser.parse_known_args()
    # key=value given right after the configs land in ``names`` (nargs="+"): they are overrides.
    overrides = [n for n in args.names if "=" in n] + overrides
    args.names = [n for n in args.names if "=" not in n]
    for name in args.names:
        if not (ROOT / "experiments" / f"{name}.yaml").is_file():
            parser.error(f"config {name!r}: no experiments/{name}.yaml (give FOLDER/ALGORITHM: navigation2d/maml_trpo)")
    if not args.names:
        parser.error("give at least one config, e.g. navigation2d/maml_trpo")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        key = f"{name}@{args.tag}" if args.tag else name
        run_dir = args.out / (name.replace("/", "-") + (f"-{args.tag}" if args.tag else ""))
        log = (args.out / f"{run_dir.name}.log").open("a")
        finished = (run_dir / "config.yaml").exists() and len(read_rows(run_dir)) >= _num_iterations(run_dir, overrides)
        train_s = None if finished else train(name, run_dir, overrides, args.minutes, log)
        eval_json = None
        if not args.no_eval:
            eval_json = args.out / f"{run_dir.name}.eval.json"
            subprocess.run(
                [sys.executable, "-m", "metarl", "evaluate", str(run_dir), "--json", str(eval_json)],
                cwd=ROOT,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        row = summarize(name, run_dir, eval_json, train_s)
        row["run_dir"] = str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir)
        if overrides:
            row["overrides"] = overrides
        # re-read before writing: other benchmark processes may have recorded other runs meanwhile
        record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": {}}
        # machine and date per record: the file-level ones describe the records that have none
        row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        row["date"] = time.strftime("%Y-%m-%d")
        record["results"][key] = row
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")
        shown = {k: v for k, v in record["results"][key].items() if k != "curve"}
        print(json.dumps({key: shown}), flush=True)


def _num_iterations(run_dir: Path, overrides: list[str]) -> int:
    """The run's ``num_iterations``, or the value an override gives it (extending a run)."""
    import yaml

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("num_iterations=")]
    return int(given[-1] if given else yaml.safe_load((run_dir / "config.yaml").read_text())["num_iterations"])


if __name__ == "__main__":
    main()
