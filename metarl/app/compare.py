"""Compare settings over seeds with honest statistics (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"): ``metarl compare RUN_OR_SWEEP_DIR...``.

Runs are grouped by setting: every run whose config equals another's but for ``seed`` is one more
seed of the same setting, and a setting is named by the config values that differ between the
settings (``algorithm=maml_trpo``, ``inner.lr=0.1``). For each setting:

- **curves**: the metric (default: the return after adaptation, or the few-shot validation
  metric) by iteration or env steps, the mean over seeds with a 95% Student-t confidence band;
- **final scores**: each run's mean of the metric over its last ``last`` logged values, summarised
  by the interquartile mean (``scipy.stats.trim_mean(x, 0.25)``), the mean and the median, each
  with a 95% stratified bootstrap interval (``scipy.stats.bootstrap``, percentile method): the runs
  of each task family are one stratum, resampled within itself (with one family, this is the
  bootstrap over seeds);
- **short runs**: a run that logged fewer iterations than the longest run of its setting (a trial
  still running, or one stopped early) is named in ``short_runs``: its final score comes from an
  earlier point and the curves stop where it stops; ``drop_short`` leaves such runs out;
- **probability of improvement** of each setting over each other, ``P(X > Y) + P(X = Y) / 2`` for
  the final scores ``X``, ``Y`` of two settings (the Mann-Whitney U statistic over ``n m``, written
  out so that the bootstrap can evaluate all resamples at once; tested against
  ``scipy.stats.mannwhitneyu``), with its bootstrap interval.

:func:`compare` writes ``compare.json``, ``curves.png``, ``final_scores.png`` and a TensorBoard
log whose HParams dashboard lists every run with its setting and final score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from metarl.app.plot import grid, read_rows, save_png
from metarl.core.config import to_dict
from metarl.runs.load import load_run_config
from metarl.runs.rundir import CONFIG, RunError, writing

#: Default metric per kind of run (the first one a run logs).
DEFAULT_METRICS = ("return/post_adapt", "val/accuracy_post_adapt", "val/mse_post_adapt", "val/loss_post_adapt")
LEVEL = 0.95


# ---------------------------------------------------------------------------------------------
# Finding and grouping runs
# ---------------------------------------------------------------------------------------------
def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories (holding ``config.yaml`` and ``metrics.jsonl``) among ``paths``, each a run
    directory or a folder of them at any depth (a sweep), sorted; one-line RunError for a path
    that holds none."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunError(f"{path} is not a directory: give run directories or folders of them (a sweep)")
        found = [p.parent for p in sorted(path.rglob(CONFIG)) if (p.parent / "metrics.jsonl").is_file()]
        if not found:
            raise RunError(f"{path} holds no metarl run (no {CONFIG} with a metrics.jsonl below it)")
        runs += found
    return sorted(set(runs))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def group_runs(run_dirs: Sequence[Path], configs: dict[Path, Any] | None = None) -> dict[str, list[Path]]:
    """Runs grouped by setting (their config without ``seed``), named by the values that differ
    between the settings (``family/algorithm`` when there is one setting). ``configs``: the runs'
    configs if already read."""
    configs = configs or {run: load_run_config(run) for run in run_dirs}
    flat = {run: {k: v for k, v in _flat(to_dict(cfg)).items() if k != "seed"} for run, cfg in configs.items()}
    settings: dict[str, list[Path]] = {}
    for run in run_dirs:
        settings.setdefault(json.dumps(flat[run], sort_keys=True), []).append(run)
    keys = sorted({k for f in flat.values() for k in f})
    differ = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    groups: dict[str, list[Path]] = {}
    for runs in settings.values():
        cfg, f = configs[runs[0]], flat[runs[0]]
        name = (
            ", ".join(f"{k}={json.loads(f[k]) if k in f else None}" for k in differ) or f"{cfg.family}/{cfg.algorithm}"
        )
        groups[name] = sorted(runs)
    return dict(sorted(groups.items()))


def short_runs(groups: dict[str, list[Path]], rows: dict[Path, list[dict[str, Any]]]) -> dict[Path, tuple[int, int]]:
    """Runs that logged fewer iterations than the longest run of their setting: ``{run: (iterations,
    longest)}``, counting iterations as the last logged ``iteration`` + 1."""
    length = {
        run: 1 + max((int(r["iteration"]) for r in rs if "iteration" in r), default=-1) for run, rs in rows.items()
    }
    short = {}
    for members in groups.values():
        longest = max(length[r] for r in members)
        short.update({r: (length[r], longest) for r in members if length[r] < longest})
    return short


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def iqm(x: Sequence[float] | np.ndarray, axis: int = -1) -> Any:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean(x, 0.25)``), over ``axis``."""
    value = stats.trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)
    return float(value) if np.ndim(value) == 0 else value


def mean(x: Sequence[float] | np.ndarray, axis: int = -1) -> Any:
    value = np.mean(np.asarray(x, dtype=float), axis=axis)
    return float(value) if np.ndim(value) == 0 else value


def median(x: Sequence[float] | np.ndarray, axis: int = -1) -> Any:
    value = np.median(np.asarray(x, dtype=float), axis=axis)
    return float(value) if np.ndim(value) == 0 else value


#: The summaries of the final scores, each vectorised over a leading batch of resamples.
STATISTICS = {"iqm": iqm, "mean": mean, "median": median}


def stratified_interval(
    strata: Sequence[Sequence[float]], statistic: Callable[..., Any], *, seed: int, resamples: int = 2000
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``statistic`` (``statistic(x, axis)``) of the pooled
    scores, each stratum (a task family's runs) resampled within itself (``scipy.stats.bootstrap``
    with independent samples). ``(nan, nan)`` when no stratum has 2 scores."""
    samples = [np.asarray(s, dtype=float) for s in strata]
    if all(len(s) < 2 for s in samples):
        return (float("nan"), float("nan"))

    def pooled(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(np.concatenate(xs, axis=axis), axis=axis)

    result = stats.bootstrap(
        samples, pooled, n_resamples=resamples, confidence_level=LEVEL, method="percentile",
        paired=False, vectorized=True, rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def probability_of_improvement(x: Any, y: Any, axis: int = -1) -> Any:
    """``P(X > Y) + P(X = Y) / 2`` over all pairs of a score of ``x`` and one of ``y`` (the
    Mann-Whitney U statistic over ``n m``); vectorised over leading dimensions."""
    x, y = np.moveaxis(np.asarray(x, dtype=float), axis, -1), np.moveaxis(np.asarray(y, dtype=float), axis, -1)
    pairs = (x[..., :, None] > y[..., None, :]) + 0.5 * (x[..., :, None] == y[..., None, :])
    value = pairs.mean(axis=(-2, -1))
    return float(value) if np.ndim(value) == 0 else value


def improvement_interval(
    x: Sequence[float], y: Sequence[float], *, seed: int, resamples: int = 2000
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`probability_of_improvement`, ``x`` and ``y``
    resampled independently."""
    if len(x) < 2 or len(y) < 2:
        return (float("nan"), float("nan"))
    result = stats.bootstrap(
        (np.asarray(x, dtype=float), np.asarray(y, dtype=float)), probability_of_improvement,
        n_resamples=resamples, confidence_level=LEVEL, method="percentile", paired=False, vectorized=True,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def t_band(values: np.ndarray) -> np.ndarray:
    """Half-width of the 95% Student-t interval of the mean over axis 0 (``[seeds, points]``); 0
    for one seed."""
    n = values.shape[0]
    if n < 2:
        return np.zeros(values.shape[1])
    return stats.t.ppf(0.5 + LEVEL / 2, n - 1) * values.std(0, ddof=1) / np.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------
def metric_of(rows_by_run: Sequence[Sequence[dict[str, Any]]], metric: str | None) -> str:
    """``metric``, checked to be logged by every run, or the first default every run logs."""
    logged = [{k for row in rows for k in row} for rows in rows_by_run]
    common = set.intersection(*logged)
    if metric is not None:
        if metric not in common:
            raise RunError(f"--metric {metric!r} is not logged by every run; logged by all: {sorted(common)}")
        return metric
    for name in DEFAULT_METRICS:
        if name in common:
            return name
    raise RunError(f"none of the default metrics {list(DEFAULT_METRICS)} is logged by every run; pass --metric")


def series(rows: Sequence[dict[str, Any]], metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """The logged ``(x, metric)`` points of one run, in order."""
    points = [(row[x], row[metric]) for row in rows if row.get(metric) is not None and row.get(x) is not None]
    if not points:
        raise RunError(f"a run logs no {metric!r} together with {x!r}")
    xs, ys = zip(*points)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def final_score(rows: Sequence[dict[str, Any]], metric: str, last: int) -> float:
    """Mean of the last ``last`` logged values of ``metric``."""
    _, ys = series(rows, metric, "iteration")
    return float(ys[-last:].mean())


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------
def compare(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    metric: str | None = None,
    x: str = "iteration",
    last: int = 1,
    seed: int = 0,
    tensorboard: bool = True,
    drop_short: bool = False,
) -> dict[str, Any]:
    """Group the runs under ``paths`` by setting and write the comparison into ``out`` (see the
    module docstring); returns what ``compare.json`` holds."""
    if last < 1:
        raise RunError(f"--last must be >= 1, got {last}")
    runs = find_runs(paths)
    configs = {run: load_run_config(run) for run in runs}
    groups = group_runs(runs, configs)
    rows = {run: read_rows(run) for run in runs}
    metric = metric_of(list(rows.values()), metric)
    families = {run: configs[run].family for run in runs}
    short = short_runs(groups, rows)
    if drop_short:
        groups = {name: [r for r in members if r not in short] for name, members in groups.items()}

    result: dict[str, Any] = {"metric": metric, "x": x, "last": last, "level": LEVEL, "settings": {}}
    result["short_runs"] = {str(r): {"iterations": n, "longest": m} for r, (n, m) in short.items()}
    result["dropped_short_runs"] = drop_short
    scores: dict[str, list[float]] = {}
    for name, members in groups.items():
        scores[name] = [final_score(rows[r], metric, last) for r in members]
        strata = [
            [s for r, s in zip(members, scores[name]) if families[r] == fam]
            for fam in sorted({families[r] for r in members})
        ]
        summary = {}
        for stat, fn in STATISTICS.items():
            summary[stat] = {"value": fn(scores[name]), "ci95": stratified_interval(strata, fn, seed=seed)}
        curve = _mean_curve([series(rows[r], metric, x) for r in members])
        result["settings"][name] = {
            "runs": [str(r) for r in members],
            "seeds": [configs[r].seed for r in members],
            "final_scores": scores[name],
            **summary,
            "curve": curve,
        }
    names = list(groups)
    result["probability_of_improvement"] = {
        f"{a} > {b}": {
            "value": probability_of_improvement(scores[a], scores[b]),
            "ci95": improvement_interval(scores[a], scores[b], seed=seed),
        }
        for a in names
        for b in names
        if a != b
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot_curves(result, out / "curves.png")
    _plot_scores(result, out / "final_scores.png")
    if tensorboard:
        _hparams(groups, scores, configs, metric, out / "tensorboard")
    return result


def _mean_curve(points: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, list[float]]:
    """Mean and 95% band over seeds at the x values every seed logged."""
    common = sorted(set.intersection(*(set(xs.tolist()) for xs, _ in points)))
    values = np.stack([np.interp(common, xs, ys) for xs, ys in points])  # exact at common points
    return {"x": list(map(float, common)), "mean": values.mean(0).tolist(), "ci95": t_band(values).tolist()}


def _plot_curves(result: dict[str, Any], path: Path) -> None:
    fig, axes = grid(1, width=6.5, height=4.0)
    ax = axes[0]
    for name, s in result["settings"].items():
        c = s["curve"]
        xs, mean, band = np.array(c["x"]), np.array(c["mean"]), np.array(c["ci95"])
        (line,) = ax.plot(xs, mean, label=f"{name} ({len(s['runs'])} seeds)", linewidth=1.3)
        ax.fill_between(xs, mean - band, mean + band, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(result["x"].replace("_", " "))
    ax.set_title(f"{result['metric']}: mean over seeds, 95% CI", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def _plot_scores(result: dict[str, Any], path: Path) -> None:
    names = list(result["settings"])
    fig, axes = grid(3, width=3.8, height=0.5 + 0.45 * len(names))
    for ax, stat in zip(axes, ("iqm", "mean", "median")):
        for i, name in enumerate(names):
            s = result["settings"][name][stat]
            lo, hi = s["ci95"]
            if np.isfinite(lo):
                ax.plot([lo, hi], [i, i], linewidth=6, alpha=0.4, solid_capstyle="butt")
            ax.plot([s["value"]], [i], "k|", markersize=12)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.set_title(f"{stat.upper() if stat == 'iqm' else stat} (95% CI)", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    save_png(fig, path)


def _hparams(
    groups: dict[str, list[Path]], scores: dict[str, list[float]], configs: dict[Path, Any], metric: str, logdir: Path
) -> None:
    """One HParams entry per run: its setting, each config value that differs between the settings
    (``inner.lr``, ``algorithm``: columns to sort and filter by), its seed and its final score."""
    from torch.utils.tensorboard import SummaryWriter

    flat = {
        run: {k: json.loads(v) for k, v in _flat(to_dict(cfg)).items() if k != "seed"} for run, cfg in configs.items()
    }
    keys = sorted({k for f in flat.values() for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1]

    def plain(value: Any) -> Any:  # HParams takes numbers, strings and booleans
        return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)

    with SummaryWriter(str(logdir)) as writer:
        for name, members in groups.items():
            for run, score in zip(members, scores[name]):
                hparams = {"setting": name, **{k: plain(flat[run].get(k)) for k in differ}}
                hparams.update(seed=configs[run].seed, run=run.name)
                writer.add_hparams(hparams, {f"final/{metric}": score}, run_name=f"{run.name}")


def table(result: dict[str, Any]) -> str:
    """The final-score table as text: IQM, mean and median with their 95% intervals per setting."""
    lines = [f"final {result['metric']} (last {result['last']} logged), 95% stratified bootstrap CI"]
    for name, s in result["settings"].items():
        cells = [
            f"{k} {s[k]['value']:.3f} [{s[k]['ci95'][0]:.3f}, {s[k]['ci95'][1]:.3f}]" for k in ("iqm", "mean", "median")
        ]
        lines.append(f"  {name} ({len(s['runs'])} runs): " + "; ".join(cells))
    for pair, p in result["probability_of_improvement"].items():
        lines.append(f"  P({pair}) = {p['value']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    """``metarl compare``: the comparison of the runs under ``args.paths``, printed and written."""
    out = Path(args.out) if args.out else Path(args.paths[0]) / "compare"
    with writing(out):
        result = compare(
            args.paths, out, metric=args.metric, x=args.x, last=args.last, seed=args.seed, drop_short=args.drop_short
        )
    what = (
        "left out"
        if args.drop_short
        else "its final score is from there and the curves stop there (--drop-short leaves it out)"
    )
    for run, n in result["short_runs"].items():
        print(
            f"warning: {run} logged {n['iterations']} iterations, its setting's longest run {n['longest']}: {what}",
            file=sys.stderr,
        )
    print(table(result))
    print(f"wrote {out}/compare.json, curves.png, final_scores.png, tensorboard/")
    return 0
