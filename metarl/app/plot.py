"""Learning curves and adaptation curves as PNG files (matplotlib, Agg, no display needed).

- :func:`plot_runs`: one subplot per metric key, one line per run directory, x = iteration (or
  another logged column such as ``env_steps``, to compare methods by the data they used), read
  from each run's ``metrics.jsonl``; a ``<key>_std`` column, when logged, is drawn as a
  shaded mean +- std band. A key logged only every few iterations (validation) is drawn through
  the iterations that log it.
- :func:`plot_adaptation`: an evaluation result (metric by number of adaptation steps, with
  95% confidence intervals), one line per method.
- :func:`plot_by_experience`: the evaluations of several runs against the episodes of experience
  on the new task, so that gradient learners (``E`` episodes per adaptation step) and RL^2 (one
  episode per step of its trial) share an axis.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (never ``pyplot``), so plotting
touches no global state and works in threads and on machines without a display. PNGs are
written atomically: a reader sees the previous file or the complete new one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metarl.core.atomic import atomic_open
from metarl.runs.rundir import METRICS, read_metrics

RL_KEYS = ("return/pre_adapt", "return/post_adapt")
FEWSHOT_KEYS = ("train/loss_pre_adapt", "train/loss_post_adapt")
STD_SUFFIX = "_std"
MAX_COLUMNS = 3


def moving_average(values: Sequence[float | None], window: int) -> np.ndarray:
    """Trailing moving average: entry ``i`` is the mean of ``values[i - window + 1 : i + 1]``.

    The first ``window - 1`` entries average the shorter prefix that exists (so the result has
    the input's length and starts at ``values[0]``). Missing values (``None``, NaN, +-inf) are
    left out of each mean; an entry whose whole window is missing is NaN. ``window=1`` returns
    the values unchanged (as floats, missing ones as NaN).
    """
    _check_window(window)
    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    ok = np.isfinite(x)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    n = count[end] - count[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (total[end] - total[start]) / np.maximum(n, 1), np.nan)


def default_keys(rows_by_run: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The keys :func:`plot_runs` draws when none are asked for.

    RL runs (any run logs ``return/pre_adapt`` or ``return/post_adapt``): those of the two that
    are logged. Otherwise few-shot runs: ``train/loss_pre_adapt`` and ``train/loss_post_adapt``
    where logged, then every ``val/*_post_adapt`` key, sorted. Empty if none of these is logged.
    """
    present = _numeric_keys(rows_by_run)
    rl = [k for k in RL_KEYS if k in present]
    if rl:
        return rl
    val = sorted(k for k in present if k.startswith("val/") and k.endswith("_post_adapt"))
    return [k for k in FEWSHOT_KEYS if k in present] + val


def curve_of(
    rows: Sequence[Mapping[str, Any]], key: str, *, smooth: int = 1, x: str = "iteration"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """One run's curve for ``key``: ``(x, y, std)``, each ``[points]``, or None if never logged.

    Only the rows that log ``key`` count (a key logged every k iterations gives one joined
    line); x is their ``iteration`` (the row index where a row has none), or with another ``x``
    that column's value (rows without it are left out); y and the
    ``<key>_std`` band (None when no such row logs it) are smoothed with :func:`moving_average`.
    """
    if x == "iteration":
        logged = [(row.get("iteration", i), row) for i, row in enumerate(rows) if row.get(key) is not None]
    else:
        logged = [(row[x], row) for row in rows if row.get(key) is not None and row.get(x) is not None]
    if not logged:
        return None
    xs = np.array([at for at, _ in logged], dtype=np.float64)
    y = moving_average([row[key] for _, row in logged], smooth)
    std = None
    if any(row.get(key + STD_SUFFIX) is not None for _, row in logged):
        std = moving_average([row.get(key + STD_SUFFIX) for _, row in logged], smooth)
    return xs, y, std


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    smooth: int = 1,
    x: str = "iteration",
    log_x: bool = False,
) -> list[str]:
    """Draw the learning curves of ``run_dirs`` into the PNG ``out``; return the keys drawn.

    Args:
        run_dirs: run directories, each holding a ``metrics.jsonl``; each is one line per
            subplot, labelled with the directory name (with its parent when two names clash).
        out: the PNG to write (parent directories are created; written atomically).
        keys: metric keys, one subplot each, in this order. Default: :func:`default_keys`
            (pre/post-adaptation returns for RL runs, losses and ``val/*_post_adapt`` for few-shot
            runs). A key logged by only some runs is drawn for those.
        smooth: trailing moving-average window (:func:`moving_average`) in logged points of
            each key (a key logged every k iterations is averaged over its last ``smooth``
            values), applied to the curves and to their ``<key>_std`` bands; 1 draws the raw
            values.
        x: the column on the x axis: ``iteration``, or one every run logs (``env_steps``:
            methods compared by the env steps they learned from).
        log_x: a logarithmic x axis (methods whose data differ by orders of magnitude, such as
            PEARL and MAML-TRPO by env steps); points at x <= 0 are left out.

    Raises:
        ValueError: no run dirs; a run dir without ``metrics.jsonl`` or without rows; a key
            logged by no run (the message lists the keys that are); no default key present;
            ``smooth`` < 1.
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty: give at least one run directory holding metrics.jsonl")
    _check_window(smooth)
    dirs = [Path(d) for d in run_dirs]
    rows_by_run = [read_rows(d) for d in dirs]
    available = sorted(_numeric_keys(rows_by_run))
    if keys is None:
        keys = default_keys(rows_by_run)
        if not keys:
            raise ValueError(
                f"none of the default keys {list(RL_KEYS) + list(FEWSHOT_KEYS) + ['val/*_post_adapt']} is "
                f"logged in {[str(d) for d in dirs]}; pass keys= from the available keys {available}"
            )
    else:
        keys = list(keys)
        if not keys:
            raise ValueError(f"keys is empty: pass None for the defaults or some of the available keys {available}")
        missing = [k for k in keys if k not in available]
        if missing:
            raise ValueError(
                f"key(s) {missing} are logged by none of the runs {[str(d) for d in dirs]}; available keys: {available}"
            )

    if x != "iteration":
        without = [str(d) for d, rows in zip(dirs, rows_by_run) if not any(row.get(x) is not None for row in rows)]
        if without:
            raise ValueError(f"x column {x!r} is not logged by {without}; available columns: {available}")
    labels = _labels(dirs)
    fig, axes = grid(len(keys))
    for ax, key in zip(axes, keys):
        for rows, label in zip(rows_by_run, labels):
            curve = curve_of(rows, key, smooth=smooth, x=x)
            if curve is None:
                continue
            xs, y, std = curve
            if log_x:
                keep = np.asarray(xs) > 0
                xs, y, std = np.asarray(xs)[keep], np.asarray(y)[keep], None if std is None else np.asarray(std)[keep]
            (line,) = ax.plot(xs, y, label=label, linewidth=1.2, marker="o" if len(xs) == 1 else None)
            if std is not None:
                ax.fill_between(xs, y - std, y + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(key + (f" (moving average, {smooth})" if smooth > 1 else ""), fontsize=10)
        ax.set_xlabel(x.replace("_", " ") + (" (log scale)" if log_x else ""))
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, out)
    return list(keys)


def plot_adaptation(result: Mapping[str, Any], out: str | os.PathLike, *, title: str = "") -> list[str]:
    """Draw an evaluation result (metric by adaptation step) into the PNG ``out``; return the methods.

    ``result`` is either the multi-method shape::

        {"metric": "return", "steps": [0, 1, 2, 3], "num_tasks": N,
         "methods": {"meta": {"mean": [...], "ci95": [...]}, "random_init": {...}, ...}}

    or the single-method shape ``{"metric", "steps", "mean", "ci95", "num_tasks"}`` (what
    ``metarl evaluate`` writes; its line is labelled ``result["method"]`` if present, else
    ``"mean"``). Each method is one line with a shaded mean +- ci95 band; ``ci95`` may be
    absent (no band). ``title`` defaults to ``"<metric> by adaptation step (N tasks)"``.

    Raises:
        ValueError: no ``steps``; neither ``methods`` nor ``mean``; a method whose ``mean`` or
            ``ci95`` length differs from ``steps``.
    """
    if "steps" not in result:
        raise ValueError(
            f"result has no 'steps' (keys: {sorted(result)}); expected "
            "{'metric', 'steps', 'methods': {name: {'mean', 'ci95'}}} or {'metric', 'steps', 'mean', 'ci95'}"
        )
    if "methods" in result:
        methods = result["methods"]
        if not isinstance(methods, Mapping) or not methods:
            raise ValueError(
                f"result['methods'] must be a non-empty mapping name -> {{'mean', 'ci95'}}, got {methods!r}"
            )
    elif "mean" in result:
        methods = {str(result.get("method", "mean")): result}
    else:
        raise ValueError(
            f"result has neither 'methods' nor 'mean' (keys: {sorted(result)}); expected "
            "{'metric', 'steps', 'methods': {name: {'mean', 'ci95'}}} or {'metric', 'steps', 'mean', 'ci95'}"
        )
    steps = np.asarray(result["steps"], dtype=np.float64)
    metric = str(result.get("metric", "value"))

    fig, (ax,) = grid(1, width=6.0, height=4.0)
    for name, values in methods.items():
        if not isinstance(values, Mapping) or "mean" not in values:
            raise ValueError(f"method {name!r} must be a mapping with 'mean' (and 'ci95'), got {values!r}")
        mean = _floats(values["mean"])
        if len(mean) != len(steps):
            raise ValueError(f"method {name!r} has {len(mean)} means for {len(steps)} steps {result['steps']}")
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=str(name))
        if values.get("ci95") is not None:
            ci = _floats(values["ci95"])
            if len(ci) != len(steps):
                raise ValueError(f"method {name!r} has {len(ci)} ci95 values for {len(steps)} steps {result['steps']}")
            ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    num_tasks = result.get("num_tasks")
    default_title = f"{metric} by adaptation step" + (f" ({num_tasks} tasks)" if num_tasks is not None else "")
    ax.set_title(title or default_title, fontsize=10)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    if len(steps) and all(float(s).is_integer() for s in steps):
        ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out)
    return [str(name) for name in methods]


def experience_of(cfg: Any, steps: Sequence[float]) -> np.ndarray:
    """Episodes of experience on the new task before each evaluated step of a run: ``s`` for RL^2
    (step ``s`` is episode ``s + 1`` of the trial) and PEARL (``s`` episodes of context), ``s * E``
    for gradient learners (``E``: the episodes of each adaptation step, ``eval.episodes_per_task``
    or ``episodes_per_task``)."""
    steps = np.asarray(steps, dtype=np.float64)
    if getattr(cfg.policy, "recurrent", None) is not None or getattr(cfg, "algorithm", None) == "pearl":
        return steps
    return steps * (cfg.eval.episodes_per_task or cfg.episodes_per_task)


def evaluation_curves(run_dirs: Sequence[Path], *, baselines: bool = False) -> tuple[dict[str, dict[str, Any]], str]:
    """Each run's evaluation (``eval_baselines.json``, else ``eval.json``) as curves for
    :func:`plot_by_experience` (label: the run's algorithm; ``baselines``: also its baselines),
    and the metric. A run without a readable evaluation is a one-line RunError."""
    import json

    from metarl.runs.load import load_run_config
    from metarl.runs.rundir import RunError

    curves: dict[str, dict[str, Any]] = {}
    metric = "return"
    algorithms: set[str] = set()
    for run in run_dirs:
        cfg = load_run_config(run)
        path = run / "eval_baselines.json" if (run / "eval_baselines.json").is_file() else run / "eval.json"
        if not path.is_file():
            raise RunError(f"{run} has no eval.json or eval_baselines.json; run metarl evaluate on it first")
        try:
            result = json.loads(path.read_text())
            methods = result.get("methods") or {"meta": result}
            metric = result.get("metric", metric)
            x = experience_of(cfg, result["steps"])
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise RunError(f"{path} is not a metarl evaluation ({type(exc).__name__}: {exc})") from None
        label = cfg.algorithm if cfg.algorithm not in algorithms else f"{cfg.algorithm} ({run.name})"
        algorithms.add(cfg.algorithm)
        for name, values in methods.items():
            if name == "meta" or baselines:
                key = label if name == "meta" else f"{name} ({cfg.algorithm} run)"
                curves[key] = {"episodes": x, "mean": values["mean"], "ci95": values.get("ci95")}
    return curves, metric


def plot_by_experience(
    curves: Mapping[str, Mapping[str, Any]], out: str | os.PathLike, *, metric: str = "return", title: str = ""
) -> list[str]:
    """One line per entry of ``curves`` (``label -> {"episodes": [...], "mean": [...], "ci95": [...]}``)
    with its 95% CI band, against episodes of experience; into the PNG ``out``. Returns the labels."""
    if not curves:
        raise ValueError("plot_by_experience needs at least one curve")
    fig, (ax,) = grid(1, width=6.5, height=4.0)
    for label, c in curves.items():
        x, mean = _floats(c["episodes"]), _floats(c["mean"])
        if len(x) != len(mean):
            raise ValueError(f"curve {label!r} has {len(mean)} means for {len(x)} points")
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=str(label))
        if c.get("ci95") is not None:
            ci = _floats(c["ci95"])
            ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title or f"{metric} on held-out tasks by experience", fontsize=10)
    ax.set_xlabel("episodes of experience on the task")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out)
    return [str(label) for label in curves]


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"smoothing window must be an int >= 1, got {window!r}")


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    if not (run_dir / METRICS).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {METRICS}"
        raise ValueError(f"run dir {run_dir} {what}: expected a metarl run directory (one written by `metarl train`)")
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"run dir {run_dir}: {METRICS} has no rows yet (the run has not finished an iteration)")
    return rows


def _numeric_keys(rows_by_run: Sequence[Sequence[Mapping[str, Any]]]) -> set[str]:
    """Keys with a number in some row of some run, ``iteration`` excluded."""
    return {
        k
        for rows in rows_by_run
        for row in rows
        for k, v in row.items()
        if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Directory names; ``parent/name`` where two runs share a name."""
    names = [d.resolve().name for d in dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def grid(n: int, *, width: float = 4.5, height: float = 3.2):
    """A figure with ``n`` subplots, at most :data:`MAX_COLUMNS` per row; unused cells hidden."""
    from matplotlib.figure import Figure

    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def save_png(fig, out: str | os.PathLike) -> None:
    """Render ``fig`` with Agg and write it to ``out`` as PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
