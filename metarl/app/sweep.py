"""``metarl sweep``: many seeds and settings of an experiment as Ray Tune trials, each a run directory.

A sweep is the cross product of its settings and seeds. The settings are the configs given (one
setting each) crossed with every ``--grid key=a,b`` option; each (setting, seed) is one trial, a
normal run directory ``OUT/<setting>-seed<k>/`` (config, checkpoints, ``metrics.jsonl``,
TensorBoard) written before anything runs, so every command that works on a run works on a trial
and ``metarl compare OUT`` compares the settings.

Ray Tune runs the trials (:func:`train_trial`, a function trainable). A trial asks for the CPUs of
its config (``threads``, at least one, plus ``ray.workers x sampler.physics_threads`` for its
rollout workers, as a placement group whose bundles the workers are scheduled into) and
``--gpus-per-trial`` GPUs. Tune restarts a trial whose process or node dies
(``FailureConfig(max_failures)``); the restarted trial continues from the last checkpoint of its
run directory, and because a resumed run is bit-identical to an uninterrupted one, it ends with
the same metrics. A stopped sweep (Ctrl-C, SIGTERM, a killed driver, a restarted head node) is
resumed with ``metarl sweep --resume NAME``: ``Tuner.restore`` keeps the finished trials and the
others continue from their checkpoints. Tune's own records live in ``OUT/tune/``.

On a cluster of several machines, ``OUT`` must be on storage every node sees (NFS or the like), as
a trial may be restarted on another node.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from metarl.app.compare import DEFAULT_METRICS
from metarl.app.comparisons import usable_cores
from metarl.core.atomic import atomic_open
from metarl.core.config import ConfigError
from metarl.core.config_files import dump_config, is_override
from metarl.runs.load import load_experiment_config, load_run_config, make_experiment, restore
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import CHECKPOINT, CONFIG, RunError, check_writable, lock_run_dir, read_metrics, writing

SPEC = "sweep.json"
TUNE_DIR = "tune"
#: The metric shown in the progress lines: the first one a trial logs (``metarl compare``'s defaults first).
SHOWN = (*DEFAULT_METRICS, "train/loss")


# ---------------------------------------------------------------------------------------------
# The trials of a sweep
# ---------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """``0-9`` (inclusive), ``0,3,7`` or ``5``: the seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a range 0-9, a list 0,3,7 or one seed") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct seeds >= 0 (a range 0-9, a list 0,3,7 or one seed)")
    return seeds


def _split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2]`` on the commas outside brackets and braces."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--grid key=a,b`` options: the key and its values (YAML, as in ``key=value`` overrides)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in _split_values(values)] if sep else []
        if not key.strip() or not parts or any(not v for v in parts):
            raise ConfigError(f"--grid {item!r}: give key=value1,value2,... (e.g. --grid inner.lr=0.05,0.1)")
        grid.append((key.strip(), parts))
    return grid


def _dirname(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)


def plan_trials(
    configs: list[Path], grid: list[tuple[str, list[str]]], seeds: list[int], overrides: list[str]
) -> list[dict[str, Any]]:
    """One entry per (setting, seed): its name, overrides and resolved config; every config is
    loaded here, so a bad value stops the sweep before anything runs."""
    trials = []
    for config in configs:
        for values in itertools.product(*[v for _, v in grid]):
            setting = [f"{key}={value}" for (key, _), value in zip(grid, values)]
            label = ",".join(([config.stem] if len(configs) > 1 else []) + setting) or config.stem
            for seed in seeds:
                items = [*overrides, *setting, f"seed={seed}"]
                try:
                    cfg = load_experiment_config(config, items)
                except ConfigError as error:
                    raise ConfigError(f"sweep setting {label} (seed {seed}): {error}") from None
                trials.append({"name": f"{_dirname(label)}-seed{seed}", "setting": label, "seed": seed, "cfg": cfg})
    return trials


def trial_resources(cfg: Any, gpus: float) -> list[dict[str, float]]:
    """Placement-group bundles of a trial: the learner (``threads`` CPUs, at least 1, and the
    GPUs), then one bundle per rollout worker."""
    learner: dict[str, float] = {"CPU": float(max(cfg.threads, 1))}
    if gpus:
        learner["GPU"] = float(gpus)
    workers = cfg.ray.workers if isinstance(cfg, RLConfig) else 0
    physics = cfg.sampler.physics_threads if isinstance(cfg, RLConfig) else 1
    return [learner] + [{"CPU": float(physics)} for _ in range(workers)]


# ---------------------------------------------------------------------------------------------
# One trial, inside Ray Tune
# ---------------------------------------------------------------------------------------------
def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: train (or continue) the run directory ``config["trial"]["run_dir"]``,
    reporting every iteration's metrics to Tune."""
    from ray import tune

    run_dir = Path(config["trial"]["run_dir"])
    cfg = load_run_config(run_dir)
    with lock_run_dir(run_dir):
        if (run_dir / CHECKPOINT).exists():
            exp, start = restore(cfg, run_dir)
        else:
            exp, start = make_experiment(cfg), 0
        try:
            if start >= cfg.num_iterations:  # finished before Tune heard of it: report the last row
                tune.report({**_numbers(read_metrics(run_dir)[-1]), "iterations_done": float(start)})
                return
            exp.train(
                run_dir,
                start=start,
                progress=False,
                on_row=lambda row: tune.report({**_numbers(row), "iterations_done": float(row["iteration"] + 1)}),
            )
        finally:
            exp.close()


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _tune_trainable(spec: dict[str, Any]):
    from ray import tune

    bundles = spec["resources"]
    return tune.with_resources(train_trial, tune.PlacementGroupFactory(bundles, strategy="PACK"))


def _progress_callback(spec: dict[str, Any], out=sys.stderr):
    from ray import tune

    class Progress(tune.Callback):
        """One line per trial at its first result, then at most every ``every_s`` seconds, and at its end."""

        def __init__(self, every_s: float) -> None:
            self.every_s = every_s
            self.last: dict[str, float] = {}
            self.first: dict[str, tuple[float, float]] = {}
            self.total = {t["name"]: t["num_iterations"] for t in spec["trials"]}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name, now = _trial_name(trial), time.time()
            done = result.get("iterations_done", 0.0)
            start_t, start_it = self.first.setdefault(name, (now, done - 1))
            total = self.total.get(name, 0)
            if now - self.last.get(name, 0.0) < self.every_s and done < total:
                return
            self.last[name] = now
            shown = next((k for k in SHOWN if k in result), None)
            value = f", {shown} {result[shown]:.4g}" if shown else ""
            rate = (now - start_t) / max(done - start_it - 1, 1) if done - start_it > 1 else None
            eta = f", about {(total - done) * rate / 60:.1f} min left" if rate is not None else ""
            print(f"trial {name}: iteration {done:.0f}/{total}{value}{eta}", file=out, flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(
                f"trial {_trial_name(trial)}: failed; restarting it from its last checkpoint "
                f"(failure {trial.num_failures} of at most {spec['max_failures']})",
                file=out,
                flush=True,
            )
            self.first.pop(_trial_name(trial), None)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {_trial_name(trial)}: failed {trial.num_failures} times; giving up", file=out, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"trial {_trial_name(trial)}: done", file=out, flush=True)

    return Progress(float(os.environ.get("METARL_SWEEP_PROGRESS_S", "10")))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _write_spec(out: Path, spec: dict[str, Any]) -> None:
    with writing(out / SPEC), atomic_open(out / SPEC, "w") as f:
        f.write(json.dumps(spec, indent=2) + "\n")


def _local_cpus(args: argparse.Namespace) -> int | None:
    """CPUs of the local Ray to start (None: a cluster is joined); a trial must fit in them."""
    if args.cpus is not None and args.cpus < 1:
        raise ConfigError(f"--cpus must be >= 1, got {args.cpus}")
    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        return None
    return args.cpus or usable_cores()


def _check_fits(resources: list[dict[str, float]], cpus: int | None) -> None:
    need = sum(bundle["CPU"] for bundle in resources)
    if cpus is not None and need > cpus:
        raise ConfigError(
            f"a trial needs {need:g} CPUs (threads, plus ray.workers x sampler.physics_threads) and the local Ray "
            f"has {cpus} (--cpus); lower threads or ray.workers, or raise --cpus"
        )


def new_sweep(args: argparse.Namespace, cpus: int | None) -> tuple[Path, dict[str, Any]]:
    """Plan the trials of ``metarl sweep CONFIG...``, write their run directories and ``sweep.json``."""
    configs, overrides = [], []
    for item in args.args:
        (overrides if is_override(item) else configs).append(item)
    if not configs:
        raise ConfigError("sweep needs at least one CONFIG.yaml (e.g. experiments/navigation2d/maml_trpo.yaml)")
    if args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures must be >= 0, got {args.max_failures}")
    name = args.name or "-".join(Path(c).stem for c in configs) + time.strftime("-%Y%m%d-%H%M%S")
    out = Path(args.out or Path("runs") / "sweeps" / name).resolve()
    if (out / SPEC).exists():
        raise RunError(f"{out} already holds a sweep; resume it with `metarl sweep --resume {name}` or pick --name")
    trials = plan_trials([Path(c) for c in configs], parse_grid(args.grid or []), parse_seeds(args.seeds), overrides)
    resources = trial_resources(trials[0]["cfg"], args.gpus_per_trial)
    if any(trial_resources(t["cfg"], args.gpus_per_trial) != resources for t in trials):
        raise ConfigError("the sweep's settings ask for different resources (threads, ray.workers); sweep them apart")
    _check_fits(resources, cpus)
    check_writable(out)
    spec: dict[str, Any] = {
        "name": name,
        "configs": [str(Path(c).resolve()) for c in configs],
        "grid": args.grid or [],
        "seeds": args.seeds,
        "overrides": overrides,
        "max_failures": args.max_failures,
        "resources": resources,
        "trials": [],
    }
    for trial in trials:
        run_dir = out / trial["name"]
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(trial["cfg"], run_dir / CONFIG)
        spec["trials"].append(
            {
                "name": trial["name"],
                "setting": trial["setting"],
                "seed": trial["seed"],
                "run_dir": str(run_dir),
                "num_iterations": trial["cfg"].num_iterations,
            }
        )
    _write_spec(out, spec)
    return out, spec


def cmd_sweep(args: argparse.Namespace) -> int:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # each trial has its own TensorBoard
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our lines only
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # SIGTERM (a scheduler, the head node going down) stops the sweep like Ctrl-C; --resume continues it
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    cpus = _local_cpus(args)
    if args.resume:
        if args.args:
            raise ConfigError("--resume NAME takes no CONFIG or overrides: the sweep's own are used")
        out = Path(args.out or Path("runs") / "sweeps" / args.resume).resolve()
        if not (out / SPEC).is_file():
            raise RunError(f"--resume {args.resume}: {out} holds no {SPEC}; give the sweep's --name (and its --out)")
        spec = json.loads((out / SPEC).read_text())
    else:
        out, spec = new_sweep(args, cpus)
    tune_path = out / TUNE_DIR
    _check_fits(spec["resources"], cpus)
    from metarl.rl.sampling.ray_sampler import init_ray

    init_ray(args.ray_address, num_cpus=cpus)
    trainable = _tune_trainable(spec)
    n = len(spec["trials"])
    t0 = time.time()
    if args.resume and tune.Tuner.can_restore(str(tune_path)):
        print(f"resuming sweep {spec['name']} in {out}: finished trials are kept", file=sys.stderr)
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        print(f"sweep {spec['name']}: {n} trials in {out}", file=sys.stderr)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(spec["trials"])},
            tune_config=tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(out),
                failure_config=tune.FailureConfig(max_failures=spec["max_failures"]),
                callbacks=[_progress_callback(spec), JsonLoggerCallback()],
                verbose=0,
            ),
        )
    results = tuner.fit()
    # every trial of the plan: one Tune never started (a sweep stopped by Ctrl-C) has no config
    by_name = {r.config["trial"]["name"]: r for r in results if r.config}
    summary = []
    for trial in spec["trials"]:
        result = by_name.get(trial["name"])
        metrics = (result.metrics if result else None) or {}
        done = metrics.get("iterations_done", 0)
        shown = next((k for k in SHOWN if k in metrics), None)
        value = f"{metrics[shown]:.4g}" if shown else "-"
        if result is not None and result.error:
            state = "failed"
        else:
            state = "done" if done >= trial["num_iterations"] else "stopped" if done else "pending"
        summary.append((trial["name"], state, done, shown or "", value))
    states = [state for _, state, *_ in summary]
    print(f"{'trial':<36} {'state':<7} {'iterations':>10}  last")
    for name, state, done, shown, value in sorted(summary):
        print(f"{name:<36} {state:<7} {done:>10.0f}  {shown} {value}")
    finished = states.count("done")
    print(f"{finished} of {n} trials done in {(time.time() - t0) / 60:.1f} min; next: metarl compare {out}")
    if finished < n:
        print(
            f"{states.count('failed')} failed, {n - finished - states.count('failed')} stopped or not started; "
            f"`metarl sweep --resume {spec['name']} --out {out}` continues them (Tune's records: {tune_path})"
        )
    return 0 if finished == n else 1


def add_parser(sub: Any) -> None:
    sw = sub.add_parser(
        "sweep",
        help="many seeds and settings as Ray Tune trials (one run directory each)",
        description="One trial per (setting, seed) on Ray Tune; every trial is a run directory under OUT.",
    )
    sw.add_argument("args", nargs="*", metavar="CONFIG.yaml... [key=value ...]")
    sw.add_argument("--seeds", default="0-4", help="seeds of every setting: 0-9, 0,3,7 or 5 (default 0-4)")
    sw.add_argument("--grid", action="append", metavar="KEY=A,B", help="one setting per value (repeat to cross)")
    sw.add_argument("--name", help="the sweep's name (default CONFIG-TIMESTAMP)")
    sw.add_argument("--out", help="where its trials go (default runs/sweeps/NAME)")
    sw.add_argument("--resume", metavar="NAME", help="continue a stopped sweep: finished trials are kept")
    sw.add_argument("--ray-address", help="Ray cluster (auto, HEAD:6379); default RAY_ADDRESS, else a local Ray")
    sw.add_argument("--cpus", type=int, help="CPUs of a local Ray (default: the usable cores)")
    sw.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPU (fraction) per trial (default 0)")
    sw.add_argument("--max-failures", type=int, default=3, help="restarts of a failed trial (default 3)")
    sw.set_defaults(func=cmd_sweep)
