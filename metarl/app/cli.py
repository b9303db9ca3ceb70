"""The ``metarl`` command: ``metarl train | evaluate | adapt | plot | export``.

Configs whose ``family`` is sinusoid or omniglot are few-shot experiments; any other family is
a meta-RL experiment on ``metarl/<family>-v0``.

Every user mistake (config, run directory, checkpoint, data directory) prints one line
``metarl: error: ...`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from metarl.core.atomic import atomic_open
from metarl.core.config import ConfigError, from_dict, to_dict
from metarl.core.config_files import apply_overrides, dump_config
from metarl.runs.load import load_experiment_config, load_run_config, make_experiment, restore

EXIT_USAGE = 2
# keys that may change when resuming: they do not change the results
RESUMABLE = ("num_iterations", "threads", "ray.workers", "ray.address")


def _default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.family}-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            keys.append(key)
    return keys


def cmd_train(args: argparse.Namespace) -> int:
    # one writer per run directory: train.lock is held from before the experiment is built to the end
    with contextlib.ExitStack() as held:
        return _train(args, held)


def _refuse_existing_run(run_dir: Path) -> None:
    from metarl.runs.rundir import CHECKPOINT, CONFIG, RunError

    if (run_dir / CHECKPOINT).exists() or (run_dir / CONFIG).exists():
        raise RunError(f"run directory {run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")


def _train(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from metarl.runs.rundir import CHECKPOINT, CONFIG, RunError, check_writable, lock_run_dir, require_run_dir, writing

    config_path, overrides = None, []
    for item in args.args:
        if "=" in item or config_path is not None:
            overrides.append(item)
        else:
            config_path = Path(item)
    if args.ray_address:
        overrides.append(f"ray.address={args.ray_address}")

    if args.resume:
        if args.run_dir is None:
            raise RunError("--resume needs --run-dir DIR: the run to continue")
        run_dir = require_run_dir(args.run_dir)
        saved_path = run_dir / CONFIG
        if not saved_path.is_file():
            raise RunError(f"--resume: {run_dir} holds no {CONFIG}; it is not a metarl run directory")
        saved = load_experiment_config(saved_path)
        cfg = load_experiment_config(config_path, overrides) if config_path else \
            from_dict(type(saved), apply_overrides(to_dict(saved), overrides))
        changed = [k for k in _diff(to_dict(saved), to_dict(cfg)) if k not in RESUMABLE]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run's {CONFIG} in {', '.join(changed)}; "
                              f"only {', '.join(RESUMABLE)} may change when resuming")
        held.enter_context(lock_run_dir(run_dir))
        exp = make_experiment(cfg)
        held.callback(exp.close)
        start = 0
        if (run_dir / CHECKPOINT).exists():
            start = exp.load_checkpoint(run_dir / CHECKPOINT)
            print(f"resuming {run_dir} from iteration {start}", file=sys.stderr)
        else:
            print(f"{run_dir} has no checkpoint yet; starting from iteration 0", file=sys.stderr)
    else:
        if config_path is None:
            raise ConfigError("train needs a CONFIG.yaml (e.g. experiments/sinusoid/maml.yaml), or --resume --run-dir DIR")
        cfg = load_experiment_config(config_path, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg)
        _refuse_existing_run(run_dir)
        check_writable(run_dir)
        exp = make_experiment(cfg)  # before creating the directory: a config the code refuses leaves none
        held.callback(exp.close)
        start = 0
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock_run_dir(run_dir))
        _refuse_existing_run(run_dir)  # another `metarl train` may have started here meanwhile
    with writing(run_dir / CONFIG):
        dump_config(cfg, run_dir / CONFIG)
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})", file=sys.stderr)
    if start >= cfg.num_iterations:
        print(f"nothing to do: the run already reached num_iterations={cfg.num_iterations}", file=sys.stderr)
        return 0
    exp.train(run_dir, start=start, progress=not args.no_progress)  # `held` closes exp and frees the lock
    from metarl.runs.rundir import read_metrics

    last = read_metrics(run_dir)[-1]
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith(("train/", "val/", "return/"))}
    print(f"done: {cfg.num_iterations} iterations; last {json.dumps(shown)}")
    print(f"next: metarl evaluate {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from metarl.runs.rundir import RunError, check_writable, require_run_dir

    run_dir = require_run_dir(args.run_dir)
    if args.num_tasks is not None and args.num_tasks < 1:
        raise ConfigError(f"--num-tasks must be >= 1, got {args.num_tasks}")
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if args.json and Path(args.json).is_dir():
        raise RunError(f"--json {args.json} is a directory; give the path of the JSON file to write")
    for where in [run_dir] + ([Path(args.json).parent] if args.json else []):
        check_writable(where)  # the results are written at the end: fail now, not after the evaluation
    cfg = load_run_config(run_dir)
    exp, iteration = restore(cfg, run_dir)
    steps = cfg.eval.steps if args.steps is None else args.steps
    num_tasks = cfg.eval.num_tasks if args.num_tasks is None else args.num_tasks
    t0 = time.perf_counter()
    if args.baselines and exp.metric != "return":
        raise ConfigError("--baselines compares meta-RL policies; this is a few-shot run")
    try:
        if args.baselines:
            return _evaluate_baselines(args, exp, run_dir, iteration, num_tasks, steps)
        result = exp.evaluate(num_tasks=num_tasks, steps=steps, seed=args.seed)
    finally:
        exp.close()
    result["iteration"] = iteration
    print(f"{run_dir} at iteration {iteration}: {result['metric']} on {num_tasks} held-out tasks "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"{'step':>5}  {'mean':>9}  {'ci95':>8}")
    for s, m, c in zip(result["steps"], result["mean"], result["ci95"]):
        print(f"{s:>5}  {m:>9.4f}  {c:>8.4f}")
    text = json.dumps(result, indent=2) + "\n"
    for path in [run_dir / "eval.json"] + ([Path(args.json)] if args.json else []):
        _write_text(path, text)
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a failure is one RunWriteError line naming the path."""
    from metarl.runs.rundir import writing

    with writing(path), atomic_open(path, "w") as f:
        f.write(text)


def cmd_adapt(args: argparse.Namespace) -> int:
    import warnings

    from metarl.app.adapt import check_adapted_out, default_adapted_dir, load

    if (args.task is None) == (args.task_index is None):
        raise ConfigError("adapt needs exactly one of --task JSON (e.g. '{\"velocity\": 1.3}') or --task-index N")
    if args.episodes < 1 or args.steps < 0:
        raise ConfigError(f"--episodes must be >= 1 and --steps >= 0, got {args.episodes} and {args.steps}")
    meta = load(args.run_dir)
    out = check_adapted_out(args.out if args.out else default_adapted_dir(args.run_dir))  # before adapting
    if args.task is not None:
        try:
            task = json.loads(args.task)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--task is not valid JSON ({exc.msg} at column {exc.colno}): {args.task}") from None
        if not isinstance(task, dict):
            raise ConfigError(f"--task must be a JSON object such as '{{\"velocity\": 1.3}}', got {args.task}")
    else:
        task = meta.task_by_index(args.task_index)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = meta.adapt(task, episodes=args.episodes, steps=args.steps, seed=args.seed, keep=args.keep)
    for w in caught:
        if "training range" in str(w.message):
            print(f"metarl: warning: {w.message}", file=sys.stderr)
    print(f"{args.run_dir}: adapted to {json.dumps(adapted.task)} with {args.episodes} episodes per step")
    print(f"{'step':>5}  {'return':>10}")
    for step, value in enumerate(adapted.returns):
        print(f"{step:>5}  {value:>10.2f}")
    why = "the highest return" if args.keep == "best" else "the last step"
    print(f"kept the policy of step {adapted.kept_step} (--keep {args.keep}: {why})")
    adapted.save(out)
    print(f"adapted policy: {out}  (metarl.load_adapted('{out}'))")
    if args.video:
        from metarl.app.adapt import VideoUnavailable

        try:
            paths = adapted.videos(out, meta=meta, seed=args.seed)
            print(f"videos: {', '.join(str(p) for p in paths)}")
        except VideoUnavailable as exc:
            print(f"metarl: warning: no video: {exc}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from metarl.app.plot import plot_runs
    from metarl.runs.rundir import writing

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "curves.png"
    try:
        with writing(out):
            keys = plot_runs([Path(d) for d in args.run_dirs], out, keys=args.keys, smooth=args.smooth)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {out} ({', '.join(keys)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from metarl.app.adapt import ADAPTED_INFO, load, load_adapted
    from metarl.app.export import to_sb3
    from metarl.runs.rundir import RunWriteError, check_writable, require_run_dir

    source = require_run_dir(args.source, what="a metarl run directory or adapted-policy directory")
    target = Path(args.sb3)
    if target.is_dir():
        raise RunWriteError(f"cannot write {target}: it is a directory; give the path of the zip to write")
    check_writable(target.parent)  # before loading the policy and building the model
    if (source / ADAPTED_INFO).is_file():
        adapted = load_adapted(source)
        policy, params, cfg = adapted.policy, adapted.params, adapted.cfg
        what = f"the policy adapted to {json.dumps(adapted.task)}"
    else:
        meta = load(source)
        policy, params, cfg = meta.policy, meta.params, meta.cfg
        what = "the meta-policy"
    env_kwargs = dict(cfg.env)
    try:
        to_sb3(policy, cfg.env_id, params=params, env_kwargs=env_kwargs, path=target)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.sb3}: {what} of {source} as a stable-baselines3 PPO model "
          f"(PPO.load('{args.sb3}'); the value network is freshly initialised)")
    return 0


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _evaluate_baselines(args, exp, run_dir: Path, iteration: int, num_tasks: int, steps: int) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from metarl.app.comparisons import evaluate_with_baselines
    from metarl.app.plot import plot_adaptation
    from metarl.runs.rundir import writing

    pretrain = args.pretrain_steps if args.pretrain_steps is not None else min(exp.env_steps, 1_000_000)
    if pretrain < 1 or args.oracle_steps < 1 or (args.oracle_tasks is not None and args.oracle_tasks < 1):
        raise ConfigError("--pretrain-steps, --oracle-steps and --oracle-tasks must be >= 1")
    oracle_tasks = min(args.oracle_tasks or num_tasks, num_tasks)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = args.jobs or _usable_cores()
    t0 = time.perf_counter()
    result = evaluate_with_baselines(exp, num_tasks=num_tasks, steps=steps, seed=args.seed, pretrain_steps=pretrain,
                                     oracle_steps=args.oracle_steps, oracle_tasks=oracle_tasks, jobs=jobs,
                                     log=lambda m: print(f"  {m} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr))
    result["iteration"] = iteration
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{run_dir} at iteration {iteration}: return on {num_tasks} held-out tasks after 0..{steps} adaptation steps")
    print(f"{'method':<12} " + "  ".join(f"{'step ' + str(s):>16}" for s in result["steps"]))
    for name, m in result["methods"].items():
        print(f"{name:<12} " + "  ".join(f"{mu:>8.2f} +- {ci:<5.2f}" for mu, ci in zip(m["mean"], m["ci95"])))
    text = json.dumps(result, indent=2) + "\n"
    for path in [run_dir / "eval_baselines.json"] + ([Path(args.json)] if args.json else []):
        _write_text(path, text)
    with writing(run_dir / "eval_baselines.png"):
        plot_adaptation(result, run_dir / "eval_baselines.png", title=f"{run_dir.name}: return by adaptation step")
    with writing(run_dir / "eval"):
        writer = SummaryWriter(log_dir=str(run_dir / "eval"))
        for name, m in result["methods"].items():
            for s, value in zip(result["steps"], m["mean"]):
                writer.add_scalar(f"eval/return_{name}", value, s)
        writer.close()
    print(f"wrote {run_dir / 'eval_baselines.json'}, {run_dir / 'eval_baselines.png'} and TensorBoard curves "
          f"(eval/return_<method>, step = adaptation step)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description="metarl: a meta-reinforcement-learning lab")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train from a YAML config",
                           description="Meta-train from CONFIG.yaml; key=value arguments override dotted config keys "
                                       "(e.g. num_iterations=100 inner.lr=0.4).")
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]")
    train.add_argument("--run-dir", help="where to write the run (default: runs/FAMILY-ALGORITHM-TIMESTAMP)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--ray-address", metavar="ADDRESS",
                       help="meta-RL: sample on this Ray cluster (same as ray.address=ADDRESS; e.g. auto)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a run on held-out tasks",
                        description="Metric before and after each inner step on held-out tasks, mean and 95%% CI.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--json", metavar="OUT", help="also write the result JSON here (always written to RUN_DIR/eval.json)")
    ev.add_argument("--num-tasks", type=int, help="held-out tasks (default: eval.num_tasks of the run, 600)")
    ev.add_argument("--steps", type=int, help="inner steps (default: eval.steps of the run)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the held-out task draw (default 0)")
    ev.add_argument("--baselines", action="store_true",
                    help="meta-RL: also score a random init, a multi-task PPO policy (both adapted with the same inner "
                         "loop), PPO from scratch with the adaptation's budget and a long-trained PPO oracle")
    ev.add_argument("--pretrain-steps", type=int, help="--baselines: PPO steps of the multi-task policy "
                    "(default: the run's env steps, at most 1,000,000)")
    ev.add_argument("--oracle-steps", type=int, default=200_000, help="--baselines: PPO steps per oracle task (default 200k)")
    ev.add_argument("--oracle-tasks", type=int, help="--baselines: how many of the tasks get an oracle (default: all)")
    ev.add_argument("--jobs", type=int, help="--baselines: worker processes for the PPO runs (default: the usable "
                    "CPU cores); the figures do not depend on it")
    ev.set_defaults(func=cmd_evaluate)

    ad = sub.add_parser("adapt", help="adapt a meta-trained policy to a new task",
                        description="Sample episodes of the meta-policy on a new task, take the inner-loop steps, print "
                                    "the return before and after each step and save the adapted policy.")
    ad.add_argument("run_dir", metavar="RUN_DIR")
    ad.add_argument("--task", help="the task as JSON, e.g. '{\"velocity\": 1.3}' (outside the training range: a warning)")
    ad.add_argument("--task-index", type=int, help="Meta-World: the N-th task of the test split")
    ad.add_argument("--episodes", type=int, default=20, help="episodes per adaptation step (default 20)")
    ad.add_argument("--steps", type=int, default=1, help="inner-loop steps (default 1)")
    ad.add_argument("--seed", type=int, default=0, help="seed of the episodes (default 0)")
    ad.add_argument("--keep", choices=("last", "best"), default="last",
                    help="which step's policy to keep: last (after --steps steps, the default) or best (the step with "
                         "the highest measured mean return; step 0 is the meta-policy itself)")
    ad.add_argument("--out", help="where to save the adapted policy (default RUN_DIR/adapted/TIMESTAMP); "
                                  "must not be a file or an existing adapted-policy directory")
    ad.add_argument("--video", action="store_true",
                    help="also record one episode before and after adaptation as GIFs in the output directory "
                         "(MuJoCo offscreen rendering; a warning, not an error, when no renderer is available)")
    ad.set_defaults(func=cmd_adapt)

    pl = sub.add_parser("plot", help="PNG learning curves of one or more runs",
                        description="Plot the learning curves of runs (metrics.jsonl) into one PNG.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/curves.png of the first run)")
    pl.add_argument("--keys", nargs="+", help="metric keys (default: returns before/after adaptation, or few-shot losses)")
    pl.add_argument("--smooth", type=int, default=1, help="moving-average window (default 1: none)")
    pl.set_defaults(func=cmd_plot)

    ex = sub.add_parser("export", help="export a meta-policy or an adapted policy to stable-baselines3",
                        description="Write the policy of a run (or of a `metarl adapt --out` directory) as a "
                                    "stable-baselines3 PPO zip with the same MLP.")
    ex.add_argument("source", metavar="RUN_OR_ADAPTED_DIR")
    ex.add_argument("--sb3", required=True, metavar="OUT.zip", help="the PPO zip to write")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal

    from envs.base import InvalidTask
    from metarl.fewshot.omniglot import OmniglotDataNotFound
    from metarl.runs.rundir import RunError, StopRequest

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM (e.g. a scheduler stopping the job) stops training at the end of the current
        # iteration, with a checkpoint of every iteration done and the logs closed.
        signal.signal(signal.SIGTERM, StopRequest.handle_sigterm)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train cfg.yaml --no-progress seed=3`)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or args.command != "train"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.args = list(args.args) + extra
    try:
        return args.func(args)
    except InvalidTask as exc:
        print(f"metarl: error: invalid task: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, RunError, OmniglotDataNotFound) as exc:
        print(f"metarl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("metarl: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
