"""metarl.app.plot: learning-curve and adaptation-curve PNGs, smoothing, default keys, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from metarl.app.plot import _labels, curve_of, default_keys, moving_average, plot_adaptation, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(root: Path, name: str, rows: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def _rl_rows(n: int = 6, offset: float = 0.0) -> list[dict]:
    return [
        {
            "iteration": i,
            "return/pre_adapt": -100.0 + 5 * i + offset,
            "return/post_adapt": -90.0 + 6 * i + offset,
            "return/pre_adapt_std": 10.0,
            "return/post_adapt_std": 8.0,
            "return/post_adapt_step1": -90.0 + 6 * i,
            "time/iteration": 1.0,
        }
        for i in range(n)
    ]


def _fewshot_rows(n: int = 5) -> list[dict]:
    return [
        {
            "iteration": i,
            "train/loss_pre_adapt": 4.0 - 0.1 * i,
            "train/loss_post_adapt": 3.0 - 0.2 * i,
            "val/accuracy_post_adapt": 0.2 + 0.1 * i,
            "val/loss_post_adapt": 2.0 - 0.1 * i,
            "val/accuracy_pre_adapt": 0.2,
            "time/iteration": 0.01,
        }
        for i in range(n)
    ]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # atomic write left no temp file


# ------------------------------------------------------------------------------------------
# moving_average
# ------------------------------------------------------------------------------------------


def test_moving_average_known_series():
    series = [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_array_equal(moving_average(series, 1), series)
    np.testing.assert_allclose(moving_average(series, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average(series, 3), [1.0, 1.5, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(moving_average(series, 10), [1.0, 1.5, 2.0, 2.5, 3.0])  # window past the start
    assert moving_average([], 4).shape == (0,)


def test_moving_average_skips_missing_values():
    np.testing.assert_allclose(moving_average([1.0, None, 3.0, math.nan, 7.0], 2), [1.0, 1.0, 3.0, 3.0, 7.0])
    np.testing.assert_allclose(moving_average([2.0, math.inf, 4.0], 3), [2.0, 2.0, 3.0])
    out = moving_average([None, None, 5.0], 2)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == 5.0


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_moving_average_rejects_bad_window(window):
    with pytest.raises(ValueError, match=rf"smoothing window must be an int >= 1, got {window!r}"):
        moving_average([1.0], window)


# ------------------------------------------------------------------------------------------
# default keys
# ------------------------------------------------------------------------------------------


def test_default_keys_rl_and_fewshot():
    assert default_keys([_rl_rows()]) == ["return/pre_adapt", "return/post_adapt"]
    assert default_keys([_fewshot_rows()]) == [
        "train/loss_pre_adapt",
        "train/loss_post_adapt",
        "val/accuracy_post_adapt",
        "val/loss_post_adapt",
    ]
    # RL wins when a row has both kinds; only the logged RL key is chosen
    mixed = [{"iteration": 0, "return/post_adapt": 1.0, "train/loss_pre_adapt": 2.0}]
    assert default_keys([mixed]) == ["return/post_adapt"]
    # union over runs: one run's key is enough
    assert default_keys(
        [[{"iteration": 0, "train/loss_post_adapt": 1.0}], [{"iteration": 0, "val/mse_post_adapt": 1.0}]]
    ) == ["train/loss_post_adapt", "val/mse_post_adapt"]
    assert default_keys([[{"iteration": 0, "time/iteration": 1.0}]]) == []


# ------------------------------------------------------------------------------------------
# curve_of
# ------------------------------------------------------------------------------------------


def test_curve_of_joins_sparse_keys_and_smooths_std():
    rows = [
        {"iteration": i, "train/loss": float(i)} | ({"val/acc": i / 10, "val/acc_std": 0.1 * i} if i % 3 == 0 else {})
        for i in range(10)
    ]
    x, y, std = curve_of(rows, "val/acc")
    np.testing.assert_array_equal(x, [0, 3, 6, 9])  # only the iterations that log the key
    np.testing.assert_allclose(y, [0.0, 0.3, 0.6, 0.9])
    np.testing.assert_allclose(std, [0.0, 0.3, 0.6, 0.9])
    x, y, std = curve_of(rows, "val/acc", smooth=2)
    np.testing.assert_allclose(y, [0.0, 0.15, 0.45, 0.75])
    np.testing.assert_allclose(std, [0.0, 0.15, 0.45, 0.75])
    x, y, std = curve_of(rows, "train/loss", smooth=3)
    assert std is None and len(x) == 10
    np.testing.assert_allclose(y[:4], [0.0, 0.5, 1.0, 2.0])
    assert curve_of(rows, "return/post_adapt") is None
    x, _, _ = curve_of([{"a": 1.0}, {"a": 2.0}], "a")  # no iteration column: the row index
    np.testing.assert_array_equal(x, [0, 1])
    # another x column: its values, rows without it left out
    steps = [{"iteration": 0, "env_steps": 100, "a": 1.0}, {"iteration": 1, "a": 2.0}, {"env_steps": 350, "a": 3.0}]
    x, y, _ = curve_of(steps, "a", x="env_steps")
    np.testing.assert_array_equal(x, [100, 350])
    np.testing.assert_array_equal(y, [1.0, 3.0])


def test_plot_runs_by_env_steps_needs_the_column_in_every_run(tmp_path):
    with_steps = _write_run(
        tmp_path, "pearl", [{"iteration": i, "env_steps": 1000 * i, "return/post_adapt": i} for i in range(3)]
    )
    without = _write_run(tmp_path, "old", [{"iteration": i, "return/post_adapt": i} for i in range(3)])
    assert plot_runs([with_steps], tmp_path / "a.png", x="env_steps") == ["return/post_adapt"]
    assert (tmp_path / "a.png").stat().st_size > 0
    with pytest.raises(ValueError, match="'env_steps' is not logged by"):
        plot_runs([with_steps, without], tmp_path / "b.png", x="env_steps")


def test_plot_runs_log_x_draws_the_positive_points_on_a_log_axis(tmp_path, monkeypatch):
    import metarl.app.plot as plot

    drawn = []
    monkeypatch.setattr(plot, "save_png", lambda fig, out: drawn.append(fig))
    run = _write_run(
        tmp_path, "pearl", [{"iteration": i, "env_steps": 1000 * i, "return/post_adapt": i} for i in range(3)]
    )
    plot.plot_runs([run], tmp_path / "a.png", x="env_steps", log_x=True)
    ax = drawn[0].axes[0]
    assert ax.get_xscale() == "log" and list(ax.lines[0].get_xdata()) == [1000, 2000]  # x = 0 left out
    assert list(ax.lines[0].get_ydata()) == [1, 2]
    plot.plot_runs([run], tmp_path / "b.png", x="env_steps")
    assert drawn[1].axes[0].get_xscale() == "linear" and list(drawn[1].axes[0].lines[0].get_xdata()) == [0, 1000, 2000]


# ------------------------------------------------------------------------------------------
# plot_runs
# ------------------------------------------------------------------------------------------


def test_plot_runs_rl_writes_png(tmp_path):
    runs = [_write_run(tmp_path, "maml", _rl_rows()), _write_run(tmp_path, "reptile", _rl_rows(4, offset=3.0))]
    out = tmp_path / "plots" / "curves.png"
    assert plot_runs(runs, out) == ["return/pre_adapt", "return/post_adapt"]
    _assert_png(out)


def test_plot_runs_fewshot_defaults_explicit_keys_and_smoothing(tmp_path):
    run = _write_run(tmp_path, "omniglot", _fewshot_rows())
    out = tmp_path / "fewshot.png"
    assert plot_runs([run], out) == [
        "train/loss_pre_adapt",
        "train/loss_post_adapt",
        "val/accuracy_post_adapt",
        "val/loss_post_adapt",
    ]
    _assert_png(out)
    out.unlink()
    assert plot_runs([str(run)], out, keys=["time/iteration"], smooth=3) == ["time/iteration"]
    _assert_png(out)


def test_plot_runs_key_logged_by_some_runs_only(tmp_path):
    rl = _write_run(tmp_path, "rl", _rl_rows())
    fewshot = _write_run(tmp_path, "fs", _fewshot_rows())
    out = tmp_path / "both.png"
    assert plot_runs([rl, fewshot], out, keys=["return/post_adapt", "val/accuracy_post_adapt"]) == [
        "return/post_adapt",
        "val/accuracy_post_adapt",
    ]
    _assert_png(out)


def test_plot_runs_replaces_existing_png(tmp_path):
    run = _write_run(tmp_path, "maml", _rl_rows())
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    plot_runs([run], out)
    _assert_png(out)


def test_labels_disambiguate_equal_names(tmp_path):
    a, b, c = tmp_path / "nav" / "maml", tmp_path / "cheetah" / "maml", tmp_path / "cheetah" / "reptile"
    assert _labels([a, b, c]) == ["nav/maml", "cheetah/maml", "reptile"]


def test_plot_runs_errors(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="run_dirs is empty"):
        plot_runs([], out)
    with pytest.raises(ValueError, match=r"run dir .*nowhere does not exist"):
        plot_runs([tmp_path / "nowhere"], out)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match=r"run dir .*bare has no metrics.jsonl"):
        plot_runs([tmp_path / "bare"], out)
    empty = _write_run(tmp_path, "empty", [])
    with pytest.raises(ValueError, match=r"run dir .*empty: metrics.jsonl has no rows"):
        plot_runs([empty], out)
    run = _write_run(tmp_path, "maml", _rl_rows())
    with pytest.raises(
        ValueError,
        match=r"key\(s\) \['val/accuracy_post_adapt'\] are logged by none of the runs .*maml.*"
        r"available keys: \['return/post_adapt', 'return/post_adapt_std'",
    ):
        plot_runs([run], out, keys=["return/pre_adapt", "val/accuracy_post_adapt"])
    with pytest.raises(ValueError, match="keys is empty"):
        plot_runs([run], out, keys=[])
    with pytest.raises(ValueError, match="smoothing window must be an int >= 1, got 0"):
        plot_runs([run], out, smooth=0)
    timing = _write_run(tmp_path, "timing", [{"iteration": 0, "time/iteration": 1.0}])
    with pytest.raises(ValueError, match=r"none of the default keys .* available keys \['time/iteration'\]"):
        plot_runs([timing], out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# plot_adaptation
# ------------------------------------------------------------------------------------------


def test_plot_adaptation_multi_method(tmp_path):
    result = {
        "metric": "return",
        "steps": [0, 1, 2, 3],
        "num_tasks": 40,
        "methods": {
            "meta": {"mean": [-60.0, -30.0, -20.0, -15.0], "ci95": [3.0, 2.0, 2.0, 1.5]},
            "random_init": {"mean": [-60.0, -58.0, -55.0, -52.0], "ci95": [3.0, 3.0, 3.0, 3.0]},
            "pretrained": {"mean": [-40.0, -38.0, -37.0, -36.0]},
        },
    }  # no ci95: no band
    out = tmp_path / "adapt.png"
    assert plot_adaptation(result, out, title="Navigation2D") == ["meta", "random_init", "pretrained"]
    _assert_png(out)


def test_plot_adaptation_single_method(tmp_path):
    result = {
        "metric": "mse",
        "steps": list(range(11)),
        "mean": [2.8 / (1 + s) for s in range(11)],
        "ci95": [0.2] * 11,
        "num_tasks": 600,
        "iteration": 70000,
    }
    out = tmp_path / "single.png"
    assert plot_adaptation(result, out) == ["mean"]
    _assert_png(out)
    assert plot_adaptation(result | {"method": "maml"}, out) == ["maml"]


def test_plot_adaptation_errors(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="result has no 'steps'"):
        plot_adaptation({"metric": "return", "mean": [1.0]}, out)
    with pytest.raises(ValueError, match="result has neither 'methods' nor 'mean'"):
        plot_adaptation({"steps": [0, 1]}, out)
    with pytest.raises(ValueError, match=r"method 'meta' has 3 means for 2 steps \[0, 1\]"):
        plot_adaptation({"steps": [0, 1], "methods": {"meta": {"mean": [1, 2, 3], "ci95": [0, 0, 0]}}}, out)
    with pytest.raises(ValueError, match=r"method 'mean' has 1 ci95 values for 2 steps"):
        plot_adaptation({"steps": [0, 1], "mean": [1, 2], "ci95": [0]}, out)
    with pytest.raises(ValueError, match=r"result\['methods'\] must be a non-empty mapping"):
        plot_adaptation({"steps": [0], "methods": {}}, out)
    assert not out.exists()


def test_experience_axis_counts_episodes_per_step_or_per_trial_episode():
    from types import SimpleNamespace

    from metarl.app.plot import experience_of

    def cfg(recurrent, eval_episodes, episodes):
        return SimpleNamespace(
            policy=SimpleNamespace(recurrent=recurrent),
            eval=SimpleNamespace(episodes_per_task=eval_episodes),
            episodes_per_task=episodes,
        )

    assert experience_of(cfg(None, None, 20), [0, 1, 2, 3]).tolist() == [0, 20, 40, 60]  # MAML: E per step
    assert experience_of(cfg(None, 10, 20), [0, 1]).tolist() == [0, 10]  # the evaluation's E when set
    assert experience_of(cfg("gru", None, 8), [0, 1, 2, 3]).tolist() == [0, 1, 2, 3]  # RL^2: one per step
    pearl = cfg(None, None, 4)
    pearl.algorithm = "pearl"
    assert experience_of(pearl, [0, 1, 2]).tolist() == [0, 1, 2]  # PEARL: one episode of context per step


def test_plot_by_experience_draws_every_curve_and_checks_lengths(tmp_path):
    from metarl.app.plot import plot_by_experience

    out = tmp_path / "exp.png"
    curves = {
        "maml_trpo": {"episodes": [0, 20, 40], "mean": [-50.0, -30.0, -25.0], "ci95": [2.0, 2.0, 2.0]},
        "rl2": {"episodes": [0, 1, 2, 3], "mean": [-60.0, -40.0, -35.0, -33.0], "ci95": None},
    }
    assert plot_by_experience(curves, out) == ["maml_trpo", "rl2"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="3 means for 2 points"):
        plot_by_experience({"x": {"episodes": [0, 1], "mean": [1.0, 2.0, 3.0]}}, out)
