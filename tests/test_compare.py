"""metarl compare: grouping by setting, IQM, stratified bootstrap intervals, probability of improvement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from metarl.app.cli import main
from metarl.app.compare import (
    compare,
    group_runs,
    improvement_interval,
    iqm,
    probability_of_improvement,
    stratified_interval,
    t_band,
)

ROOT = Path(__file__).resolve().parents[1]


def test_iqm_by_hand():
    # 8 values: the lowest and highest quarter (2 each) are dropped, the mean of 3, 4, 5, 6 is 4.5
    assert iqm([100, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)
    assert iqm([1, 2, 3, 4]) == pytest.approx(2.5)  # drops 1 and 4


def test_probability_of_improvement_by_hand():
    # pairs (x, y): 1 beats only 0; 2 ties 2 twice (1/2 each) and beats 0; 3 beats all: (1 + 2 + 3) / 9
    assert probability_of_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)
    assert probability_of_improvement([2, 2, 0], [1, 2, 3]) == pytest.approx(3 / 9)
    assert probability_of_improvement([5, 6], [1, 2]) == 1.0
    x, y = np.random.default_rng(1).integers(0, 5, size=(2, 9))  # with ties: the Mann-Whitney U over n m
    assert probability_of_improvement(x, y) == pytest.approx(stats.mannwhitneyu(x, y).statistic / 81)


def test_bootstrap_intervals_known_cases():
    # one stratum {0, 1}: resampled means are 0, 1/2, 1 (1/4, 1/2, 1/4): the 95% interval is [0, 1]
    assert stratified_interval([[0.0, 1.0]], np.mean, seed=0) == (0.0, 1.0)
    # a second stratum {10, 10} resampled within itself: pooled means (a + b + 20) / 4 in [5, 5.5];
    # resampling the four values together would reach 10 (all four 10s)
    assert stratified_interval([[0.0, 1.0], [10.0, 10.0]], np.mean, seed=0) == (5.0, 5.5)
    # a constant sample has a zero-width interval; one score per stratum has none
    assert stratified_interval([[3.0, 3.0, 3.0]], iqm, seed=0) == (3.0, 3.0)
    assert all(np.isnan(stratified_interval([[1.0], [2.0]], iqm, seed=0)))
    # one stratum is scipy's percentile bootstrap with the same generator
    x = np.random.default_rng(5).normal(size=12)
    ours = stratified_interval([x], iqm, seed=7)
    scipy_ci = stats.bootstrap(
        (x,), lambda v, axis=-1: stats.trim_mean(v, 0.25, axis=axis), n_resamples=2000, method="percentile",
        vectorized=True, rng=np.random.default_rng(7),
    ).confidence_interval  # fmt: skip
    assert ours == pytest.approx((scipy_ci.low, scipy_ci.high))
    # P(improvement) of separated samples: every resample gives 1
    assert improvement_interval([5, 6, 7], [1, 2, 3], seed=0) == (1.0, 1.0)


def test_t_band_by_hand():
    values = np.array([[1.0, 0.0], [3.0, 0.0]])  # two seeds: mean 2 and sd sqrt(2) at x0; constant at x1
    np.testing.assert_allclose(t_band(values), [stats.t.ppf(0.975, 1) * 1.0, 0.0])  # sd / sqrt(2) = 1
    assert t_band(values[:1]).tolist() == [0.0, 0.0]


def _run(base: Path, name: str, *, algorithm: str, seed: int, returns: list[float]) -> Path:
    run = base / name
    run.mkdir(parents=True)
    cfg = yaml.safe_load((ROOT / "experiments/navigation2d/maml_trpo.yaml").read_text())
    cfg.update(algorithm=algorithm, seed=seed)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"iteration": i, "env_steps": 100 * (i + 1), "return/post_adapt": r} for i, r in enumerate(returns)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    base = tmp_path / "sweep"
    for seed, finals in enumerate([(-10.0, -20.0), (-12.0, -21.0), (-8.0, -25.0), (-30.0, -19.0)]):
        _run(base, f"maml-{seed}", algorithm="maml_trpo", seed=seed, returns=[-50.0, -40.0 + seed, finals[0]])
        _run(base / "nested", f"reptile-{seed}", algorithm="reptile", seed=seed, returns=[-50.0, -45.0, finals[1]])
    return base


def test_runs_are_grouped_by_setting_without_the_seed(sweep):
    groups = group_runs(sorted(p.parent for p in sweep.rglob("config.yaml")))
    assert list(groups) == ["algorithm=maml_trpo", "algorithm=reptile"]
    assert [r.name for r in groups["algorithm=maml_trpo"]] == [f"maml-{s}" for s in range(4)]


def test_compare_figures_and_files(sweep, tmp_path):
    out = tmp_path / "cmp"
    result = compare([sweep], out, seed=3)
    maml, reptile = result["settings"]["algorithm=maml_trpo"], result["settings"]["algorithm=reptile"]
    assert maml["final_scores"] == [-10.0, -12.0, -8.0, -30.0] and maml["seeds"] == [0, 1, 2, 3]
    assert maml["iqm"]["value"] == pytest.approx(-11.0)  # middle two of -30, -12, -10, -8
    assert maml["mean"]["value"] == pytest.approx(-15.0) and maml["median"]["value"] == pytest.approx(-11.0)
    assert reptile["iqm"]["value"] == pytest.approx(-20.5)  # middle two of -25, -21, -20, -19
    lo, hi = maml["iqm"]["ci95"]
    assert -30.0 <= lo <= -11.0 <= hi <= -8.0
    # maml beats reptile in 12 of 16 pairs (-30 loses to all four)
    assert result["probability_of_improvement"]["algorithm=maml_trpo > algorithm=reptile"]["value"] == 0.75
    # the curve: mean over seeds at each iteration, with the t band
    assert maml["curve"]["x"] == [0.0, 1.0, 2.0]
    assert maml["curve"]["mean"][1] == pytest.approx(-40.0 + 1.5)
    assert maml["curve"]["ci95"][0] == 0.0
    assert maml["curve"]["ci95"][1] == pytest.approx(stats.t.ppf(0.975, 3) * np.std([0, 1, 2, 3], ddof=1) / 2)
    for name in ("compare.json", "curves.png", "final_scores.png"):
        assert (out / name).stat().st_size > 0
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((out / "compare.json").read_text())["metric"] == "return/post_adapt"
    # --last 2: the mean of the last two logged values
    again = compare([sweep], tmp_path / "cmp2", last=2, tensorboard=False)
    assert again["settings"]["algorithm=reptile"]["final_scores"][0] == pytest.approx((-45.0 - 20.0) / 2)
    by_steps = compare([sweep], tmp_path / "cmp3", x="env_steps", tensorboard=False)
    assert by_steps["settings"]["algorithm=reptile"]["curve"]["x"] == [100.0, 200.0, 300.0]


def test_a_run_with_fewer_iterations_than_its_setting_is_named_and_can_be_left_out(tmp_path, capsys):
    base = tmp_path / "sweep"
    for seed in range(3):
        _run(base, f"maml-{seed}", algorithm="maml_trpo", seed=seed, returns=[-50.0, -40.0, -10.0 - seed])
    short = _run(base, "maml-3", algorithm="maml_trpo", seed=3, returns=[-50.0, -44.0])  # still running
    kept = compare([base], tmp_path / "kept", tensorboard=False)
    assert kept["short_runs"] == {str(short): {"iterations": 2, "longest": 3}}
    maml = kept["settings"]["Navigation2D/maml_trpo"]
    assert maml["final_scores"] == [-10.0, -11.0, -12.0, -44.0]  # the short run's score is from iteration 1
    assert maml["curve"]["x"] == [0.0, 1.0]  # the curves stop where it stops
    dropped = compare([base], tmp_path / "dropped", tensorboard=False, drop_short=True)
    maml = dropped["settings"]["Navigation2D/maml_trpo"]
    assert maml["final_scores"] == [-10.0, -11.0, -12.0] and maml["curve"]["x"] == [0.0, 1.0, 2.0]
    assert main(["compare", str(base), "--out", str(tmp_path / "o"), "--drop-short"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {short} logged 2 iterations, its setting's longest run 3: left out" in captured.err
    assert "(3 runs)" in captured.out


def test_cli_compare_and_its_errors(sweep, tmp_path, capsys):
    assert main(["compare", str(sweep), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert (
        "algorithm=maml_trpo (4 runs): iqm -11.000" in printed
        and "P(algorithm=maml_trpo > algorithm=reptile) = 0.75" in printed
    )
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "holds no metarl run" in capsys.readouterr().err
    assert main(["compare", str(sweep), "--metric", "nope", "--out", str(tmp_path / "o2")]) == 2
    assert "--metric 'nope' is not logged by every run" in capsys.readouterr().err


def test_hparams_dashboard_lists_each_run_with_the_settings_values_and_final_score(sweep, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    compare([sweep], tmp_path / "cmp")
    found = {}
    for events in (tmp_path / "cmp" / "tensorboard").rglob("events.out.tfevents.*"):
        hparams, final = None, None
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams = data.session_start_info.hparams
                elif value.tag == "final/return/post_adapt":
                    final = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
        if hparams is not None:
            found[hparams["run"].string_value] = (
                hparams["algorithm"].string_value,
                hparams["seed"].number_value,
                hparams["setting"].string_value,
                final,
            )
    assert found == {
        **{f"maml-{s}": ("maml_trpo", s, "algorithm=maml_trpo", f) for s, f in enumerate([-10.0, -12.0, -8.0, -30.0])},
        **{f"reptile-{s}": ("reptile", s, "algorithm=reptile", f) for s, f in enumerate([-20.0, -21.0, -25.0, -19.0])},
    }
