"""Omniglot on unseen alphabets: the alphabet split, within-alphabet tasks, their config and CLI.

Every task check identifies the sampled images from the data set's own images and names (an
index of all 4 rotations of every drawing), never from the sampler's internals.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.app.cli import main
from metarl.core.config import from_dict
from metarl.fewshot.omniglot import Omniglot
from metarl.fewshot.tasks import FewShotSampler
from metarl.runs.fewshot import TaskSource
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rundir import RunError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO_ROOT.parent / "shared" / "data" / "omniglot").resolve()
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
CONFIG = REPO_ROOT / "experiments" / "omniglot" / "maml_20w1s_alphabets.yaml"

needs_data = pytest.mark.skipif(
    not all((DATA_DIR / z).is_file() for z in SMALL_ZIPS),
    reason=f"shared Omniglot data not found at {DATA_DIR} (expected {', '.join(SMALL_ZIPS)})",
)

# The documented split of the minimal data (split_seed 0, 1 val and 2 test alphabets).
TEST_ALPHABETS = {"Greek", "Korean"}
VAL_ALPHABETS = {"Japanese_(katakana)"}
TRAIN_ALPHABETS = {"Balinese", "Early_Aramaic", "Latin", "Sanskrit", "Tagalog"}


@pytest.fixture(scope="module")
def shared() -> Omniglot:
    return Omniglot.load(DATA_DIR)


@pytest.fixture(scope="module")
def image_index(shared: Omniglot) -> dict[bytes, tuple[str, str, int, int]]:
    """uint8 image bytes -> (alphabet, character, drawing, rotation), over the whole data set."""
    index: dict[bytes, tuple[str, str, int, int]] = {}
    for k in range(4):
        rotated = torch.rot90(shared.images, k, dims=(-2, -1)).contiguous().numpy()
        for c, (alphabet, character) in enumerate(shared.characters):
            for d in range(rotated.shape[1]):
                key = rotated[c, d].tobytes()
                assert key not in index, "two drawings share an image: identification would be ambiguous"
                index[key] = (alphabet, character, d, k)
    return index


def identify(x: torch.Tensor, index: dict) -> list[tuple[str, str, int, int]]:
    """Sampled float images ``[M, 1, S, S]`` (ink / 255) -> their (alphabet, character, drawing, rotation)."""
    u8 = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    return [index[img.tobytes()] for img in u8]


def omniglot_cfg(**omniglot) -> FewShotConfig:
    section = {"root": str(DATA_DIR), **omniglot}
    return from_dict(
        FewShotConfig, {"family": "omniglot", "algorithm": "maml", "num_iterations": 1, "omniglot": section}
    )


# ------------------------------------------------------------------------------------------
# The alphabet split
# ------------------------------------------------------------------------------------------


@needs_data
def test_minimal_data_alphabets_and_documented_split(shared: Omniglot) -> None:
    # characters per alphabet, counted from the zips' member names
    names: set[tuple[str, str]] = set()
    for z in SMALL_ZIPS:
        with zipfile.ZipFile(DATA_DIR / z) as zf:
            names |= {tuple(Path(n).parts[-3:-1]) for n in zf.namelist() if n.endswith(".png")}
    sizes = dict(sorted(Counter(a for a, _ in names).items()))
    assert sizes == {
        "Balinese": 24,
        "Early_Aramaic": 22,
        "Greek": 24,
        "Japanese_(katakana)": 47,
        "Korean": 40,
        "Latin": 26,
        "Sanskrit": 42,
        "Tagalog": 17,
    }
    assert shared.alphabet_sizes == sizes
    s = shared.split_alphabets(num_val=1, num_test=2, seed=0)
    assert {a for a, _ in s.test_characters} == TEST_ALPHABETS
    assert {a for a, _ in s.val_characters} == VAL_ALPHABETS
    assert {a for a, _ in s.train_characters} == TRAIN_ALPHABETS
    assert (len(s.train_characters), len(s.val_characters), len(s.test_characters)) == (131, 47, 64)
    assert s.train.shape == (131, 20, 28, 28) and s.val.shape == (47, 20, 28, 28) and s.test.shape == (64, 20, 28, 28)


@needs_data
@pytest.mark.parametrize("num_val, num_test, seed", [(1, 2, 0), (1, 2, 1), (2, 3, 7), (1, 1, 3)])
def test_alphabet_split_is_disjoint_and_complete(shared: Omniglot, num_val: int, num_test: int, seed: int) -> None:
    s = shared.split_alphabets(num_val=num_val, num_test=num_test, seed=seed)
    chars = [set(s.train_characters), set(s.val_characters), set(s.test_characters)]
    alphabets = [{a for a, _ in c} for c in chars]
    assert [len(a) for a in alphabets] == [8 - num_val - num_test, num_val, num_test]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not alphabets[i] & alphabets[j] and not chars[i] & chars[j]
    assert set().union(*chars) == set(shared.characters)
    for names, images in ((s.train_characters, s.train), (s.val_characters, s.val), (s.test_characters, s.test)):
        assert names == sorted(names) and len(names) == len(set(names)) == images.shape[0]
        for row, name in enumerate(names):  # rows are the data set's images of that character
            assert torch.equal(images[row], shared.images[shared.characters.index(name)])


def test_split_alphabets_synthetic_follows_the_documented_permutation() -> None:
    sizes = {"Ae": 3, "Bo": 1, "Cy": 4, "Da": 2, "Ek": 5, "Fu": 2}
    characters = [(a, f"c{i}") for a in sorted(sizes) for i in range(sizes[a])]
    data = Omniglot(
        images=torch.arange(len(characters)).view(-1, 1, 1, 1).expand(-1, 2, 3, 3).to(torch.uint8),
        characters=characters,
        image_size=3,
    )
    for seed in range(5):
        s = data.split_alphabets(num_val=2, num_test=1, seed=seed)
        perm = np.random.default_rng(seed).permutation(6)
        names = sorted(sizes)
        expect_test = {names[i] for i in perm[:1]}
        expect_val = {names[i] for i in perm[1:3]}
        assert s.test_characters == [c for c in characters if c[0] in expect_test]
        assert s.val_characters == [c for c in characters if c[0] in expect_val]
        assert s.train_characters == [c for c in characters if c[0] not in expect_test | expect_val]
        assert s.val[:, 0, 0, 0].tolist() == [characters.index(c) for c in s.val_characters]


@needs_data
def test_split_alphabets_is_deterministic_and_checked(shared: Omniglot) -> None:
    a = shared.split_alphabets(num_val=1, num_test=2, seed=0)
    b = shared.split_alphabets(num_val=1, num_test=2, seed=0)
    assert a.test_characters == b.test_characters and a.val_characters == b.val_characters
    assert torch.equal(a.train, b.train)
    assert shared.split_alphabets(num_val=1, num_test=2, seed=1).test_characters != a.test_characters
    with pytest.raises(ValueError, match=r"num_val=3 \+ num_test=5 = 8 alphabets leaves no training alphabet out of 8"):
        shared.split_alphabets(num_val=3, num_test=5)
    with pytest.raises(ValueError, match="num_test must be a non-negative int"):
        shared.split_alphabets(num_val=1, num_test=-1)


# ------------------------------------------------------------------------------------------
# Within-alphabet tasks
# ------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("rotations", [True, False])
def test_every_within_alphabet_task_is_one_alphabet(shared: Omniglot, image_index: dict, rotations: bool) -> None:
    s = shared.split_alphabets(num_val=1, num_test=2, seed=0)
    n_way, k_shot, k_query, t = 20, 1, 2, 150
    sampler = FewShotSampler(
        s.test,
        n_way=n_way,
        k_shot=k_shot,
        k_query=k_query,
        rotations=rotations,
        alphabets=[a for a, _ in s.test_characters],
    )
    batch = sampler.sample(t, np.random.default_rng(11))
    assert batch.support_x.shape == (t, n_way * k_shot, 1, 28, 28)
    assert batch.query_x.shape == (t, n_way * k_query, 1, 28, 28)
    per_alphabet: Counter[str] = Counter()
    rotations_seen: set[int] = set()
    characters_seen: dict[str, set[str]] = {}
    for i in range(t):
        support = identify(batch.support_x[i], image_index)
        query = identify(batch.query_x[i], image_index)
        labelled = list(zip(support + query, batch.support_y[i].tolist() + batch.query_y[i].tolist()))
        alphabets = {a for (a, _, _, _), _ in labelled}
        assert len(alphabets) == 1, f"task {i} mixes alphabets {alphabets}"
        (alphabet,) = alphabets
        assert alphabet in TEST_ALPHABETS
        assert len({k for (_, _, _, k), _ in labelled}) == 1  # one rotation per task
        class_of: dict[int, str] = {}
        drawings: dict[int, list[int]] = {}
        for (_, character, d, k), y in labelled:
            assert class_of.setdefault(y, character) == character  # a label is one character
            drawings.setdefault(y, []).append(d)
            rotations_seen.add(k)
        assert sorted(class_of) == list(range(n_way))
        assert len(set(class_of.values())) == n_way  # n_way distinct characters
        assert all(len(set(ds)) == k_shot + k_query for ds in drawings.values())  # support/query disjoint
        per_alphabet[alphabet] += 1
        characters_seen.setdefault(alphabet, set()).update(class_of.values())
    assert rotations_seen == ({0, 1, 2, 3} if rotations else {0})
    assert set(per_alphabet) == TEST_ALPHABETS and min(per_alphabet.values()) > 0.35 * t  # alphabets drawn uniformly
    for alphabet, seen in characters_seen.items():  # every character of an alphabet can be drawn
        assert seen == {c for a, c in s.test_characters if a == alphabet}


def _tiny_alphabet_data() -> tuple[torch.Tensor, list[str]]:
    images = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (9, 4, 6, 6), dtype=np.uint8))
    return images, ["Xa"] * 2 + ["Yb"] * 4 + ["Zc"] * 3


def test_within_alphabet_sampling_is_seeded() -> None:
    images, alphabets = _tiny_alphabet_data()
    kw = {"n_way": 2, "k_shot": 1, "k_query": 2, "alphabets": alphabets}
    a = FewShotSampler(images, **kw).sample(12, np.random.default_rng(3))
    b = FewShotSampler(images, **kw).sample(12, np.random.default_rng(3))
    c = FewShotSampler(images, **kw).sample(12, np.random.default_rng(4))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.support_x, c.support_x)
    # without alphabets the same images give the across-alphabet draws of the original sampler
    across = FewShotSampler(images, n_way=2, k_shot=1, k_query=2).sample(12, np.random.default_rng(3))
    assert not torch.equal(across.support_x, a.support_x)


def test_alphabet_too_small_for_n_way_is_one_clear_error() -> None:
    images, alphabets = _tiny_alphabet_data()
    for rotations in (True, False):  # a task keeps one rotation: rotations add no classes to an alphabet
        with pytest.raises(ValueError) as info:
            FewShotSampler(images, n_way=3, k_shot=1, k_query=1, rotations=rotations, alphabets=alphabets)
        message = str(info.value)
        assert "\n" not in message
        assert "n_way=3" in message and "Xa (2 characters)" in message
        assert "Yb" not in message and "Zc" not in message
    with pytest.raises(ValueError, match="alphabet of each of the 9 characters, got 8 entries"):
        FewShotSampler(images, n_way=2, k_shot=1, k_query=1, alphabets=alphabets[:-1])


# ------------------------------------------------------------------------------------------
# TaskSource and the config
# ------------------------------------------------------------------------------------------


@needs_data
def test_character_split_unchanged(shared: Omniglot) -> None:
    cfg = omniglot_cfg()
    o = cfg.omniglot
    assert (o.split, o.within_alphabet, o.train_within_alphabet, o.eval_within_alphabet) == (
        "characters",
        None,
        False,
        False,
    )
    tasks = TaskSource(cfg)
    s = shared.split(num_val=30, num_test=50, seed=0)
    assert tasks.characters == {"train": s.train_characters, "val": s.val_characters, "test": s.test_characters}
    for name, images in (("train", s.train), ("val", s.val), ("test", s.test)):
        sampler = getattr(tasks, name)
        assert not sampler.within_alphabet
        direct = FewShotSampler(images, n_way=5, k_shot=10, k_query=10, rotations=True)
        got, want = sampler.sample(3, np.random.default_rng(9)), direct.sample(3, np.random.default_rng(9))
        assert torch.equal(got.support_x, want.support_x) and torch.equal(got.query_x, want.query_x)


@needs_data
def test_task_source_alphabet_split(shared: Omniglot, image_index: dict) -> None:
    cfg = omniglot_cfg(split="alphabets", n_way=20)
    assert cfg.omniglot.eval_within_alphabet and not cfg.omniglot.train_within_alphabet
    tasks = TaskSource(cfg)
    s = shared.split_alphabets(num_val=1, num_test=2, seed=0)
    assert tasks.characters == {"train": s.train_characters, "val": s.val_characters, "test": s.test_characters}
    assert not tasks.train.within_alphabet and tasks.val.within_alphabet and tasks.test.within_alphabet
    # the split does not depend on the run seed
    assert TaskSource(cfg.model_copy(update={"seed": 5})).characters == tasks.characters
    # training tasks mix the training alphabets (20 of 524 classes: some task has 2+ alphabets)
    batch = tasks.train.sample(4, np.random.default_rng(0))
    mixed = [len({a for a, *_ in identify(batch.support_x[i], image_index)}) for i in range(4)]
    assert max(mixed) > 1
    assert {a for i in range(4) for a, *_ in identify(batch.query_x[i], image_index)} <= TRAIN_ALPHABETS
    # within_alphabet: false evaluates unseen alphabets with tasks across them
    across = TaskSource(omniglot_cfg(split="alphabets", within_alphabet=False))
    assert not across.test.within_alphabet and not across.val.within_alphabet


@needs_data
def test_task_source_names_the_small_alphabet() -> None:
    with pytest.raises(RunError) as info:
        TaskSource(omniglot_cfg(split="alphabets", n_way=20, train_within_alphabet=True))
    message = str(info.value)
    assert "\n" not in message
    assert "(train split)" in message and "n_way=20" in message and "Tagalog (17 characters)" in message
    with pytest.raises(RunError, match=r"omniglot.num_val_alphabets / num_test_alphabets: .*leaves no training"):
        TaskSource(omniglot_cfg(split="alphabets", num_val_alphabets=4, num_test_alphabets=4))


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@needs_data
@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["omniglot.n_way=30"], ["(test split)", "n_way=30", "Greek (24 characters)"]),
        (["omniglot.split=alphabet"], ["omniglot.split", "'alphabets'"]),
    ],
    ids=["alphabet-too-small", "bad-split"],
)
def test_cli_errors(tmp_path: Path, overrides: list[str], needles: list[str]) -> None:
    run = tmp_path / "run"
    rc, _, err = cli("train", "--run-dir", run, "--no-progress", CONFIG, f"omniglot.root={DATA_DIR}", *overrides)
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarl: error: "), lines
    for needle in needles:
        assert needle in lines[0]
    assert not run.exists()


@needs_data
def test_cli_train_and_evaluate_on_unseen_alphabets(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny = ["omniglot.filters=8", "num_iterations=5", "eval.every=0", "meta_batch_size=2", "threads=1"]
    rc, out, err = cli("train", "--run-dir", run, "--no-progress", CONFIG, f"omniglot.root={DATA_DIR}", *tiny)
    assert rc == 0, err
    saved = (run / "config.yaml").read_text()
    assert "split: alphabets" in saved and "n_way: 20" in saved
    rc, out, err = cli("evaluate", run, "--num-tasks", 4, "--steps", 1, "--seed", 2, "--json", tmp_path / "a.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["metric"] == "accuracy" and result["num_tasks"] == 4 and len(result["mean"]) == 2
    assert all(0.0 <= m <= 1.0 for m in result["mean"])
    rc, _, err = cli("evaluate", run, "--num-tasks", 4, "--steps", 1, "--seed", 2, "--json", tmp_path / "b.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "b.json").read_text()) == result
