"""FewShotClassifier: a user's own images through a meta-trained Omniglot run."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarl.app.classifier import FewShotClassifier
from metarl.app.cli import main
from metarl.runs.rundir import RunError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("clf") / "run"
    rc = main(
        [
            "train",
            "experiments/omniglot/maml_5w1s.yaml",
            "--run-dir",
            str(run),
            "--no-progress",
            f"omniglot.root={DATA}",
            "omniglot.filters=8",
            "num_iterations=2",
            "meta_batch_size=2",
            "eval.every=0",
            "eval.steps=2",
        ]
    )
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def pictures() -> dict[str, list[Image.Image]]:
    """Five Tagalog characters, six drawings each, as PIL images straight from the zip."""
    with zipfile.ZipFile(DATA / "images_background_small2.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png") and "/Tagalog/" in n)
        chars = sorted({n.split("/")[2] for n in names})[:5]
        return {c: [Image.open(io.BytesIO(z.read(n))).copy() for n in names if n.split("/")[2] == c][:6] for c in chars}


def test_adapt_predict_with_user_labels(run_dir, pictures):
    clf = FewShotClassifier.from_run(run_dir)
    labels = [f"glyph-{c}" for c in pictures]
    support = [imgs[0] for imgs in pictures.values()]
    adapted = clf.adapt(support, labels, steps=25)
    assert adapted.classes_ == labels
    # 25 steps on the support set fit it: each support image gets its own label back
    assert list(adapted.predict(support)) == labels
    proba = adapted.predict_proba([imgs[1] for imgs in pictures.values()])
    assert proba.shape == (5, 5)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert set(adapted.predict([pictures[next(iter(pictures))][2]])) <= set(labels)


def test_inputs_of_every_kind_give_the_same_prediction(run_dir, pictures, tmp_path):
    clf = FewShotClassifier.from_run(run_dir)
    support = [imgs[0] for imgs in pictures.values()]
    query = pictures[next(iter(pictures))][3]
    path = tmp_path / "q.png"
    query.save(path)
    big = query.convert("L").resize((210, 210), Image.Resampling.NEAREST)  # another size, same picture
    adapted = clf.adapt(support, [0, 1, 2, 3, 4])
    p_pil = adapted.predict_proba([query])
    np.testing.assert_array_equal(adapted.predict_proba([str(path)]), p_pil)
    np.testing.assert_array_equal(adapted.predict_proba(np.asarray(query.convert("L"))[None]), p_pil)
    np.testing.assert_allclose(adapted.predict_proba([big]), p_pil, atol=0.05)


def test_zero_steps_is_the_meta_trained_model(run_dir, pictures):
    clf = FewShotClassifier.from_run(run_dir)
    support = [imgs[0] for imgs in pictures.values()]
    a0 = clf.adapt(support, list("abcde"), steps=0)
    a2 = clf.adapt(support, list("abcde"), steps=2)
    for name, value in a0.params.items():
        assert value.equal(dict(clf.model.named_parameters())[name].detach())
    assert any(not a2.params[k].equal(v) for k, v in a0.params.items())


def test_bad_support_sets(run_dir, pictures):
    clf = FewShotClassifier.from_run(run_dir)
    support = [imgs[0] for imgs in pictures.values()]
    with pytest.raises(ValueError, match=r"meta-trained for 5-way tasks; the support set has 3 distinct labels"):
        clf.adapt(support[:3], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"got 5 support images but 4 labels"):
        clf.adapt(support, ["a", "b", "c", "d"])


def test_from_run_rejects_non_image_runs(tmp_path):
    run = tmp_path / "sin"
    assert (
        main(
            [
                "train",
                "experiments/sinusoid/maml.yaml",
                "--run-dir",
                str(run),
                "--no-progress",
                "num_iterations=1",
                "eval.every=0",
            ]
        )
        == 0
    )
    with pytest.raises(RunError, match="'sinusoid' run"):
        FewShotClassifier.from_run(run)
    with pytest.raises(RunError, match="not a metarl run directory"):
        FewShotClassifier.from_run(tmp_path)
