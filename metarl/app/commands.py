"""What each ``metarl`` subcommand does: train, evaluate (with --baselines), adapt, plot, export.

Every user mistake raises ConfigError or RunError (one line); :func:`metarl.app.cli.main` prints it
and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from metarl.core.atomic import atomic_open
from metarl.core.config import ConfigError, from_dict, to_dict
from metarl.core.config_files import apply_overrides, dump_config, is_override
from metarl.runs.load import load_experiment_config, load_run_config, make_experiment, restore
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import (
    CHECKPOINT,
    CONFIG,
    RunError,
    RunWriteError,
    check_writable,
    lock_run_dir,
    read_metrics,
    require_run_dir,
    writing,
)

EXIT_USAGE = 2
# keys that may change when resuming: they do not change the results
RESUMABLE = (
    "num_iterations",
    "threads",
    "ray.workers",
    "ray.address",
    "sampler.batch_physics",
    "sampler.physics_threads",
)


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

    if (run_dir / CHECKPOINT).exists() or (run_dir / CONFIG).exists():
        raise RunError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
        )


def _train(args: argparse.Namespace, held: contextlib.ExitStack) -> int:

    config_path, overrides = None, []
    for item in args.args:
        if is_override(item) or config_path is not None:
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
        cfg = (
            load_experiment_config(config_path, overrides)
            if config_path
            else from_dict(type(saved), apply_overrides(to_dict(saved), overrides))
        )
        changed = [k for k in _diff(to_dict(saved), to_dict(cfg)) if k not in RESUMABLE]
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run's {CONFIG} in {', '.join(changed)}; "
                f"only {', '.join(RESUMABLE)} may change when resuming"
            )
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
            raise ConfigError(
                "train needs a CONFIG.yaml (e.g. experiments/sinusoid/maml.yaml), or --resume --run-dir DIR"
            )
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

    last = read_metrics(run_dir)[-1]
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith(("train/", "val/", "return/"))}
    print(f"done: {cfg.num_iterations} iterations; last {json.dumps(shown)}")
    print(f"next: metarl evaluate {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

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
    if args.baselines and not isinstance(cfg, RLConfig):
        raise ConfigError("--baselines compares meta-RL policies; this is a few-shot run")
    if args.metaworld:
        return _evaluate_metaworld(args, cfg, run_dir)
    exp, iteration = restore(cfg, run_dir)
    steps = cfg.eval.steps if args.steps is None else args.steps
    num_tasks = cfg.eval.num_tasks if args.num_tasks is None else args.num_tasks
    t0 = time.perf_counter()
    try:
        if args.baselines:
            from metarl.app.comparisons import evaluate_baselines_command

            return evaluate_baselines_command(args, exp, run_dir, iteration, num_tasks, steps)
        result = exp.evaluate(num_tasks=num_tasks, steps=steps, seed=args.seed)
    finally:
        exp.close()
    result["iteration"] = iteration
    print(
        f"{run_dir} at iteration {iteration}: {result['metric']} on {num_tasks} held-out tasks "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print(f"{'step':>5}  {'mean':>9}  {'ci95':>8}")
    for s, m, c in zip(result["steps"], result["mean"], result["ci95"]):
        print(f"{s:>5}  {m:>9.4f}  {c:>8.4f}")
    text = json.dumps(result, indent=2) + "\n"
    for path in [run_dir / "eval.json"] + ([Path(args.json)] if args.json else []):
        _write_text(path, text)
    return 0


def _evaluate_metaworld(args: argparse.Namespace, cfg: Any, run_dir: Path) -> int:
    """``metarl evaluate --metaworld``: Meta-World's own protocol on both splits."""
    from metarl.app.adapt import load
    from metarl.app.metaworld_eval import evaluate_splits

    if not (isinstance(cfg, RLConfig) and cfg.family.startswith("MetaWorld")):
        raise ConfigError(f"--metaworld scores Meta-World runs; this run's family is {cfg.family}")
    for name in ("num_evals", "adaptation_episodes", "evaluation_episodes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    meta = load(run_dir)
    t0 = time.perf_counter()
    try:
        result = evaluate_splits(
            meta,
            num_evals=args.num_evals,
            adaptation_episodes=args.adaptation_episodes,
            evaluation_episodes=args.evaluation_episodes,
            meta_batch_size=args.meta_batch_size,
            seed=args.seed,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:  # e.g. a meta-batch size the split's classes do not divide
        raise ConfigError(str(exc)) from None
    finally:
        meta.experiment.close()
    print(f"{run_dir}: Meta-World success rate, {args.num_evals} rounds ({time.perf_counter() - t0:.1f} s)")
    print(f"{'split':>6}  {'success':>8}  {'ci95':>6}  Metaworld 3.0's count (first episodes per class)")
    for split, r in result["splits"].items():
        first = r["metaworld_3_0"]
        print(f"{split:>6}  {r['mean'][0]:>8.3f}  {r['ci95'][0]:>6.3f}  ", end="")
        print(f"{first['mean'][0]:.3f} +- {first['ci95'][0]:.3f}")
    text = json.dumps(result, indent=2) + "\n"
    for path in [run_dir / "eval_metaworld.json"] + ([Path(args.json)] if args.json else []):
        _write_text(path, text)
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a failure is one RunWriteError line naming the path."""

    with writing(path), atomic_open(path, "w") as f:
        f.write(text)


def cmd_adapt(args: argparse.Namespace) -> int:
    import warnings

    from metarl.app.adapt import load
    from metarl.app.adapted_files import check_adapted_out, default_adapted_dir

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
    trial = meta.experiment.trials  # RL^2: adapts by running a trial of --episodes episodes
    infers = hasattr(meta.experiment, "infer")  # PEARL: adapts by inferring z from --episodes episodes
    if (trial or infers) and args.keep != "last":
        raise ConfigError(
            "--keep best does not apply to RL^2 and PEARL runs: the adapted policy is the one after the episodes"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = meta.adapt(task, episodes=args.episodes, steps=args.steps, seed=args.seed, keep=args.keep)
    for w in caught:
        if "training range" in str(w.message):
            print(f"metarl: warning: {w.message}", file=sys.stderr)
    if trial or infers:  # one return per episode of experience
        how = f"by a trial of {args.episodes} episodes" if trial else f"from {args.episodes} episodes of context"
        print(f"{args.run_dir}: adapted to {json.dumps(adapted.task)} {how}")
        print(f"{'episode':>7}  {'return':>10}")
        for episode, value in enumerate(adapted.returns, start=1):
            print(f"{episode:>7}  {value:>10.2f}")
        kept = "the policy with its state" if trial else "the actor at the posterior mean of z"
        print(f"kept {kept} after episode {len(adapted.returns)}")
    else:
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

    if args.evaluations:
        return _plot_evaluations(args)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "curves.png"
    try:
        with writing(out):
            keys = plot_runs(
                [Path(d) for d in args.run_dirs], out, keys=args.keys, smooth=args.smooth, x=args.x, log_x=args.log_x
            )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {out} ({', '.join(keys)})")
    return 0


def _plot_evaluations(args: argparse.Namespace) -> int:
    """``metarl plot --evaluations``: every run's evaluation against episodes of experience."""
    from metarl.app.plot import evaluation_curves, plot_by_experience

    curves, metric = evaluation_curves([require_run_dir(d) for d in args.run_dirs], baselines=args.baselines)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "experience.png"
    with writing(out):
        labels = plot_by_experience(curves, out, metric=metric)
    print(f"wrote {out} ({', '.join(labels)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from metarl.app.adapt import ADAPTED_INFO, load, load_adapted
    from metarl.app.export import to_sb3

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
        to_sb3(policy, cfg.env_id, params=params, env_kwargs=env_kwargs, path=target, action_scale=cfg.action_scale)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"wrote {args.sb3}: {what} of {source} as a stable-baselines3 PPO model "
        f"(PPO.load('{args.sb3}'); the value network is freshly initialised)"
    )
    return 0
