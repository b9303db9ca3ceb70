"""The ``metarl`` command: ``metarl train | evaluate | adapt | plot | export | compare | sweep``.

Configs whose ``family`` is sinusoid or omniglot are few-shot experiments; any other family is
a meta-RL experiment on ``metarl/<family>-v0``.

Every user mistake (config, run directory, checkpoint, data directory) prints one line
``metarl: error: ...`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from metarl.app.commands import EXIT_USAGE, cmd_adapt, cmd_evaluate, cmd_export, cmd_plot, cmd_train
from metarl.app.compare import cmd_compare
from metarl.app.comparisons import DEFAULT_ORACLE_STEPS, DEFAULT_ORACLE_TASKS, DEFAULT_PRETRAIN_STEPS
from metarl.app.sweep import add_parser as add_sweep_parser
from metarl.core.config import ConfigError
from metarl.core.config_files import is_override


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description="metarl: a meta-reinforcement-learning lab")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="meta-train from a YAML config",
        description="Meta-train from CONFIG.yaml; key=value arguments override dotted config keys "
        "(e.g. num_iterations=100 inner.lr=0.4).",
    )
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]")
    train.add_argument("--run-dir", help="where to write the run (default: runs/FAMILY-ALGORITHM-TIMESTAMP)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="meta-RL: sample on this Ray cluster (same as ray.address=ADDRESS; e.g. auto)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a run on held-out tasks",
        description="Metric before and after each inner step on held-out tasks, mean and 95%% CI.",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument(
        "--json", metavar="OUT", help="also write the result JSON here (always written to RUN_DIR/eval.json)"
    )
    ev.add_argument("--num-tasks", type=int, help="held-out tasks (default: eval.num_tasks of the run, 600)")
    ev.add_argument("--steps", type=int, help="inner steps (default: eval.steps of the run)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the held-out task draw (default 0)")
    ev.add_argument(
        "--baselines",
        action="store_true",
        help="meta-RL: also score a random init, a multi-task PPO policy (both adapted with the same inner "
        "loop), PPO from scratch with the adaptation's budget and a long-trained PPO oracle",
    )
    ev.add_argument(
        "--pretrain-steps",
        type=int,
        help="--baselines: PPO steps of the multi-task policy (default: the run's env steps, at most "
        f"{DEFAULT_PRETRAIN_STEPS:,})",
    )
    ev.add_argument(
        "--oracle-steps",
        type=int,
        default=DEFAULT_ORACLE_STEPS,
        help=f"--baselines: PPO steps per oracle task (default {DEFAULT_ORACLE_STEPS:,})",
    )
    ev.add_argument(
        "--oracle-tasks",
        type=int,
        default=DEFAULT_ORACLE_TASKS,
        help=f"--baselines: how many of the held-out tasks get an oracle (default {DEFAULT_ORACLE_TASKS})",
    )
    ev.add_argument(
        "--jobs",
        type=int,
        help="--baselines: PPO jobs at a time, as Ray tasks on a local Ray (default: the usable CPU cores; 1: one "
        "after another in this process, no Ray); the figures do not depend on it",
    )
    ev.add_argument(
        "--ray-address",
        help="--baselines: run the PPO jobs on this Ray cluster (e.g. auto or HEAD:6379; default: RAY_ADDRESS "
        "if set, else a local Ray)",
    )
    ev.add_argument(
        "--metaworld",
        action="store_true",
        help="Meta-World runs: success rates on the train and test splits by Meta-World's own protocol "
        "(metaworld.evaluation.metalearning_evaluation), written to RUN_DIR/eval_metaworld.json",
    )
    ev.add_argument("--num-evals", type=int, default=10, help="--metaworld: rounds, each on new goals (default 10)")
    ev.add_argument(
        "--adaptation-episodes", type=int, default=10, help="--metaworld: episodes per adaptation step (default 10)"
    )
    ev.add_argument(
        "--evaluation-episodes", type=int, default=3, help="--metaworld: evaluation episodes per task (default 3)"
    )
    ev.add_argument(
        "--meta-batch-size",
        type=int,
        help="--metaworld: sub-envs (tasks) per round, a multiple of the split's classes (default: 20 for ML1, "
        "5 per class otherwise; each class's goals are dealt out evenly among its sub-envs, 40 of ML1's 50 for 20)",
    )
    ev.set_defaults(func=cmd_evaluate)

    ad = sub.add_parser(
        "adapt",
        help="adapt a meta-trained policy to a new task",
        description="Sample episodes of the meta-policy on a new task, take the inner-loop steps, print "
        "the return before and after each step and save the adapted policy.",
    )
    ad.add_argument("run_dir", metavar="RUN_DIR")
    ad.add_argument(
        "--task", help="the task as JSON, e.g. '{\"velocity\": 1.3}' (outside the training range: a warning)"
    )
    ad.add_argument("--task-index", type=int, help="Meta-World: the N-th task of the test split")
    ad.add_argument("--episodes", type=int, default=20, help="episodes per adaptation step (default 20)")
    ad.add_argument("--steps", type=int, default=1, help="inner-loop steps (default 1)")
    ad.add_argument("--seed", type=int, default=0, help="seed of the episodes (default 0)")
    ad.add_argument(
        "--keep",
        choices=("last", "best"),
        default="last",
        help="which step's policy to keep: last (after --steps steps, the default) or best (the step with "
        "the highest measured mean return; step 0 is the meta-policy itself)",
    )
    ad.add_argument(
        "--out",
        help="where to save the adapted policy (default RUN_DIR/adapted/TIMESTAMP); "
        "must not be a file or an existing adapted-policy directory",
    )
    ad.add_argument(
        "--video",
        action="store_true",
        help="also record one episode before and after adaptation as GIFs in the output directory "
        "(MuJoCo offscreen rendering; a warning, not an error, when no renderer is available)",
    )
    ad.set_defaults(func=cmd_adapt)

    pl = sub.add_parser(
        "plot",
        help="PNG learning curves of one or more runs",
        description="Plot the learning curves of runs (metrics.jsonl) into one PNG.",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/curves.png of the first run)")
    pl.add_argument(
        "--keys", nargs="+", help="metric keys (default: returns before/after adaptation, or few-shot losses)"
    )
    pl.add_argument("--smooth", type=int, default=1, help="moving-average window (default 1: none)")
    pl.add_argument(
        "--x",
        default="iteration",
        help="x axis: iteration (default) or a logged column, e.g. env_steps to compare methods by their data",
    )
    pl.add_argument("--log-x", action="store_true", help="logarithmic x axis (e.g. PEARL and MAML-TRPO by env steps)")
    pl.add_argument(
        "--evaluations",
        action="store_true",
        help="instead: each run's evaluation (eval_baselines.json, else eval.json) against the episodes of "
        "experience on the new task, all runs in one plot (MAML-type learners and RL^2 side by side); "
        "--baselines adds the baselines of the runs that have them",
    )
    pl.add_argument("--baselines", action="store_true", help="--evaluations: also draw each run's baselines")
    pl.set_defaults(func=cmd_plot)

    ex = sub.add_parser(
        "export",
        help="export a meta-policy or an adapted policy to stable-baselines3",
        description="Write the policy of a run (or of a `metarl adapt --out` directory) as a "
        "stable-baselines3 PPO zip with the same MLP.",
    )
    ex.add_argument("source", metavar="RUN_OR_ADAPTED_DIR")
    ex.add_argument("--sb3", required=True, metavar="OUT.zip", help="the PPO zip to write")
    ex.set_defaults(func=cmd_export)

    co = sub.add_parser(
        "compare",
        help="compare settings over seeds: curves with 95%% bands, IQM and bootstrap CIs, P(improvement)",
        description="Group runs by setting (their config without the seed) and compare them with honest "
        "statistics (Agarwal et al. 2021): learning curves with a 95%% confidence band over seeds, the "
        "interquartile mean, mean and median of the final scores with 95%% stratified bootstrap intervals, "
        "and the probability of improvement between settings. Writes compare.json, curves.png, "
        "final_scores.png and a TensorBoard HParams log.",
    )
    co.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    co.add_argument("--metric", help="logged metric (default: return/post_adapt, or the few-shot validation metric)")
    co.add_argument("--x", default="iteration", help="x axis of the curves: iteration (default) or env_steps")
    co.add_argument("--last", type=int, default=1, help="final score: mean of the last N logged values (default 1)")
    co.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    co.add_argument(
        "--drop-short", action="store_true", help="leave out runs with fewer iterations than their setting's longest"
    )
    co.add_argument("--out", help="output folder (default: compare/ inside the first path)")
    co.set_defaults(func=cmd_compare)
    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal

    from envs.base import InvalidTask
    from metarl.fewshot.omniglot import OmniglotDataNotFound
    from metarl.runs.experiment import TrainingDiverged
    from metarl.runs.rundir import RunError, StopRequest

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM (e.g. a scheduler stopping the job) stops training at the end of the current
        # iteration, with a checkpoint of every iteration done and the logs closed.
        signal.signal(signal.SIGTERM, StopRequest.handle_sigterm)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train cfg.yaml --no-progress seed=3`)
    unknown = [
        item
        for item in extra
        if item.startswith("-") or not is_override(item) or args.command not in ("train", "sweep")
    ]
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
    except TrainingDiverged as exc:
        print(f"metarl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metarl: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
