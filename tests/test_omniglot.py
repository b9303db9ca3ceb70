"""Tests for metarl.fewshot.omniglot: preprocessing, loading, splitting and task sampling."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarl.fewshot.batch import FewShotBatch
from metarl.fewshot.images import preprocess_images
from metarl.fewshot.omniglot import Omniglot, OmniglotDataNotFound, OmniglotSplits
from metarl.fewshot.tasks import FewShotSampler

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "omniglot"
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")

needs_data = pytest.mark.skipif(
    not all((DATA_DIR / z).is_file() for z in SMALL_ZIPS),
    reason=f"shared Omniglot data not found at {DATA_DIR} (expected {', '.join(SMALL_ZIPS)})",
)


@pytest.fixture(scope="module")
def shared() -> Omniglot:
    return Omniglot.load(DATA_DIR)


# ------------------------------------------------------------------------------------------
# Synthetic data sets
# ------------------------------------------------------------------------------------------


def _synthetic_png(seed: int, size: int = 21) -> Image.Image:
    """A 1-bit, Omniglot-like picture: black strokes on white."""
    rng = np.random.default_rng(seed)
    white = rng.random((size, size)) > 0.3
    return Image.fromarray(white).convert("1")


def _write_tree(base: Path) -> list[tuple[str, str]]:
    """2 alphabets x 3 characters x 4 drawers under base/<alphabet>/<character>/<id>_<drawer>.png."""
    names = []
    for a, alphabet in enumerate(["Alpha", "Beta"]):
        for c in range(1, 4):
            char = f"character{c:02d}"
            d = base / alphabet / char
            d.mkdir(parents=True)
            for drawer in range(1, 5):
                _synthetic_png(100 * a + 10 * c + drawer).save(d / f"{a}{c:02d}_{drawer:02d}.png")
            names.append((alphabet, char))
    return names


def test_folder_and_zip_layouts_load_identically(tmp_path: Path) -> None:
    folder_root = tmp_path / "as_folder"
    names = _write_tree(folder_root / "images_background")
    zip_root = tmp_path / "as_zip"
    zip_root.mkdir()
    with zipfile.ZipFile(zip_root / "images_evaluation.zip", "w") as zf:
        for png in sorted((folder_root / "images_background").rglob("*.png")):
            rel = png.relative_to(folder_root / "images_background")
            zf.write(png, f"images_evaluation/{rel.as_posix()}")

    from_folder = Omniglot.load(folder_root, image_size=12)
    from_zip = Omniglot.load(zip_root, image_size=12)
    assert from_folder.characters == sorted(names)
    assert from_zip.characters == from_folder.characters
    assert from_folder.images.shape == (6, 4, 12, 12)
    assert from_folder.images.dtype == torch.uint8
    assert torch.equal(from_folder.images, from_zip.images)
    # every stored image is exactly preprocess_images of its file
    png = folder_root / "images_background" / "Beta" / "character02" / "102_03.png"
    row = from_folder.characters.index(("Beta", "character02"))
    assert torch.equal(from_folder.images[row, 2].float() / 255, preprocess_images(png, image_size=12)[0, 0])


def test_unequal_drawing_counts_name_the_character(tmp_path: Path) -> None:
    _write_tree(tmp_path / "images_background")
    next((tmp_path / "images_background" / "Alpha" / "character03").glob("*.png")).unlink()
    with pytest.raises(ValueError, match="Alpha/character03"):
        Omniglot.load(tmp_path, image_size=8)


def test_corrupt_zip_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "images_background_small1.zip"
    bad.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(ValueError, match="images_background_small1.zip"):
        Omniglot.load(tmp_path)


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_directory(tmp_path: Path, make_dir: bool) -> None:
    root = tmp_path / "omniglot"
    if make_dir:
        root.mkdir()
        (root / "unrelated.txt").write_text("nothing here")
    with pytest.raises(OmniglotDataNotFound) as info:
        Omniglot.load(root)
    message = str(info.value)
    assert "\n" not in message
    assert str(root) in message
    assert "github.com/brendenlake/omniglot" in message
    for expected in ("images_background.zip", "images_evaluation.zip", *SMALL_ZIPS):
        assert expected in message
    assert isinstance(info.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------
# Shared data
# ------------------------------------------------------------------------------------------


@needs_data
def test_shared_minimal_splits(shared: Omniglot) -> None:
    assert shared.images.shape == (242, 20, 28, 28)
    assert shared.images.shape[0] * shared.images.shape[1] == 4840
    assert len(shared.characters) == len(set(shared.characters)) == 242
    assert shared.characters == sorted(shared.characters)
    assert len(shared.alphabets) == 8
    # Greek and Latin are in both zips; they must be counted once.
    per_zip: dict[str, set[tuple[str, str]]] = {}
    for name in SMALL_ZIPS:
        with zipfile.ZipFile(DATA_DIR / name) as zf:
            per_zip[name] = {tuple(Path(n).parts[-3:-1]) for n in zf.namelist() if n.endswith(".png")}
    overlap = per_zip[SMALL_ZIPS[0]] & per_zip[SMALL_ZIPS[1]]
    assert {a for a, _ in overlap} == {"Greek", "Latin"}
    assert len(per_zip[SMALL_ZIPS[0]]) + len(per_zip[SMALL_ZIPS[1]]) - len(overlap) == 242
    counts = {a: sum(1 for x, _ in shared.characters if x == a) for a in ("Greek", "Latin")}
    assert counts == {a: sum(1 for x, _ in overlap if x == a) for a in ("Greek", "Latin")}
    # cached: a second load in this process is the same object
    assert Omniglot.load(DATA_DIR) is shared


@needs_data
def test_preprocess_equivalent_inputs_and_loader_agreement(shared: Omniglot, tmp_path: Path) -> None:
    member = "images_background_small1/Greek/character05/"
    with zipfile.ZipFile(DATA_DIR / SMALL_ZIPS[0]) as zf:
        files = sorted(n for n in zf.namelist() if n.startswith(member) and n.endswith(".png"))
        raw = zf.read(files[3])
    path = tmp_path / Path(files[3]).name
    path.write_bytes(raw)
    pil = Image.open(io.BytesIO(raw))
    assert pil.size == (105, 105)
    gray = np.asarray(pil.convert("L"))
    variants = {
        "str path": str(path),
        "Path": path,
        "PIL": pil,
        "uint8": gray,
        "float64": gray / 255.0,
        "float32": gray.astype(np.float32) / 255.0,
        "HxWx1 tensor": torch.from_numpy(gray.copy())[:, :, None],
        "RGB uint8": np.repeat(gray[:, :, None], 3, axis=2),
        "bool": np.asarray(pil),
    }
    ref = preprocess_images(path)
    assert ref.shape == (1, 1, 28, 28) and ref.dtype == torch.float32
    for name, item in variants.items():
        assert torch.equal(preprocess_images(item), ref), name
    # sequence and stacked forms
    assert torch.equal(preprocess_images([path, gray]), torch.cat([ref, ref]))
    assert torch.equal(preprocess_images(np.stack([gray, gray])), torch.cat([ref, ref]))
    # ink = 1, white = 0, values in [0, 1]
    assert ref.min() >= 0 and ref.max() <= 1
    assert 0.02 < ref.mean() < 0.5  # mostly background
    # the loader stores exactly what preprocess_images gives for that file
    row = shared.characters.index(("Greek", "character05"))
    assert torch.equal(shared.images[row, 3].float() / 255, ref[0, 0])


def test_preprocess_ink_and_background() -> None:
    img = np.full((105, 105), 255, dtype=np.uint8)
    img[:, :50] = 0  # left part ink
    out = preprocess_images(img, image_size=28)
    assert out.shape == (1, 1, 28, 28)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 27, 5] == 1.0
    assert out[0, 0, 0, 27] == 0.0 and out[0, 0, 27, 27] == 0.0
    assert torch.equal(preprocess_images(np.ones((40, 40))), torch.zeros(1, 1, 28, 28))
    assert torch.equal(preprocess_images(np.zeros((40, 40), np.uint8), image_size=5), torch.ones(1, 1, 5, 5))
    # transparent background counts as white
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    rgba[10:20, 10:20, 3] = 255  # opaque black square on transparent
    out = preprocess_images(rgba, image_size=30)
    assert out[0, 0, 0, 0] == 0.0 and out[0, 0, 15, 15] == 1.0


def test_preprocess_bad_inputs(tmp_path: Path) -> None:
    good = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError, match="item 1.*dict"):
        preprocess_images([good, {"not": "an image"}])
    with pytest.raises(FileNotFoundError, match="item 1.*nope.png"):
        preprocess_images([good, tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="image 0.*shape"):
        preprocess_images(np.zeros((10,)))
    with pytest.raises(ValueError, match=r"item 0.*\[0, 1\]"):
        preprocess_images([np.full((5, 5), 2.0)])
    (tmp_path / "junk.png").write_text("not a png")
    with pytest.raises(ValueError, match="junk.png"):
        preprocess_images(tmp_path / "junk.png")


# ------------------------------------------------------------------------------------------
# Split
# ------------------------------------------------------------------------------------------


@needs_data
def test_split(shared: Omniglot) -> None:
    splits = shared.split(num_val=20, num_test=40, seed=3)
    assert isinstance(splits, OmniglotSplits)
    assert splits.train.shape == (182, 20, 28, 28)
    assert splits.val.shape == (20, 20, 28, 28)
    assert splits.test.shape == (40, 20, 28, 28)
    tr, va, te = map(set, (splits.train_characters, splits.val_characters, splits.test_characters))
    assert len(tr) == 182 and len(va) == 20 and len(te) == 40
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(shared.characters)
    row = shared.characters.index(splits.test_characters[7])
    assert torch.equal(splits.test[7], shared.images[row])
    again = shared.split(num_val=20, num_test=40, seed=3)
    assert again.test_characters == splits.test_characters and torch.equal(again.train, splits.train)
    other = shared.split(num_val=20, num_test=40, seed=4)
    assert other.test_characters != splits.test_characters
    with pytest.raises(ValueError, match="num_val=200.*num_test=42"):
        shared.split(num_val=200, num_test=42)


def test_split_synthetic() -> None:
    data = Omniglot(
        images=torch.arange(10).view(10, 1, 1, 1).expand(10, 2, 3, 3).to(torch.uint8),
        characters=[("A", f"c{i:02d}") for i in range(10)],
        image_size=3,
    )
    s = data.split(num_val=2, num_test=3, seed=0)
    perm = np.random.default_rng(0).permutation(10)
    assert [c for _, c in s.test_characters] == [f"c{i:02d}" for i in sorted(perm[:3])]
    assert [c for _, c in s.val_characters] == [f"c{i:02d}" for i in sorted(perm[3:5])]
    assert s.test[:, 0, 0, 0].tolist() == sorted(perm[:3].tolist())


# ------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------

C, D, S = 6, 7, 5


@pytest.fixture(scope="module")
def tiny() -> torch.Tensor:
    # random patterns: every image and each of its rotations is unique and asymmetric
    return torch.from_numpy(np.random.default_rng(123).random((C, D, S, S)).astype(np.float32))


def _identify(img: torch.Tensor, images: torch.Tensor) -> tuple[int, int, int]:
    """(character, drawing, rotation) of a sampled [1, S, S] image."""
    hits = [
        (c, d, k)
        for c in range(images.shape[0])
        for d in range(images.shape[1])
        for k in range(4)
        if torch.equal(img[0], torch.rot90(images[c, d], k, dims=(-2, -1)))
    ]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("rotations", [True, False])
def test_sampler_structure(tiny: torch.Tensor, rotations: bool) -> None:
    n_way, k_shot, k_query, t = 4, 2, 3, 6
    sampler = FewShotSampler(tiny, n_way=n_way, k_shot=k_shot, k_query=k_query, rotations=rotations)
    assert sampler.num_classes == (4 * C if rotations else C)
    batch = sampler.sample(t, np.random.default_rng(0))
    assert isinstance(batch, FewShotBatch)
    assert batch.support_x.shape == (t, n_way * k_shot, 1, S, S)
    assert batch.query_x.shape == (t, n_way * k_query, 1, S, S)
    assert batch.support_y.shape == (t, n_way * k_shot)
    assert batch.query_y.shape == (t, n_way * k_query)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    seen_rotations = set()
    for i in range(t):
        assert torch.bincount(batch.support_y[i], minlength=n_way).tolist() == [k_shot] * n_way
        assert torch.bincount(batch.query_y[i], minlength=n_way).tolist() == [k_query] * n_way
        label_class: dict[int, tuple[int, int]] = {}
        label_drawings: dict[int, list[int]] = {}
        for xs, ys in ((batch.support_x[i], batch.support_y[i]), (batch.query_x[i], batch.query_y[i])):
            for x, y in zip(xs, ys.tolist()):
                c, d, k = _identify(x, tiny)
                assert label_class.setdefault(y, (c, k)) == (c, k)  # one class per label
                label_drawings.setdefault(y, []).append(d)
                seen_rotations.add(k)
        assert len(set(label_class.values())) == n_way  # distinct classes
        for drawings in label_drawings.values():  # support and query drawings are disjoint
            assert len(drawings) == len(set(drawings)) == k_shot + k_query
    assert seen_rotations == ({0, 1, 2, 3} if rotations else {0})


def test_sampler_uint8_matches_float(tiny: torch.Tensor) -> None:
    u8 = (tiny * 255).round().to(torch.uint8)
    a = FewShotSampler(u8, n_way=3, k_shot=1, k_query=2).sample(4, np.random.default_rng(9))
    b = FewShotSampler(u8.float() / 255, n_way=3, k_shot=1, k_query=2).sample(4, np.random.default_rng(9))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sampler_uint8_scaling_is_exact() -> None:
    # every uint8 value appears; the sampler must map v to exactly torch's v.float() / 255
    u8 = torch.arange(256, dtype=torch.uint8).view(4, 4, 4, 4)
    batch = FewShotSampler(u8, n_way=16, k_shot=2, k_query=2).sample(2, np.random.default_rng(0))
    values = torch.cat([batch.support_x[0].flatten(), batch.query_x[0].flatten()])
    assert torch.equal(torch.unique(values), torch.arange(256, dtype=torch.uint8).float() / 255)


def test_sampler_determinism(tiny: torch.Tensor) -> None:
    sampler = FewShotSampler(tiny, n_way=5, k_shot=1, k_query=2)
    a = sampler.sample(8, np.random.default_rng(42))
    b = sampler.sample(8, np.random.default_rng(42))
    c = sampler.sample(8, np.random.default_rng(43))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, c.support_x)


def test_sampler_validation(tiny: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="n_way=25"):
        FewShotSampler(tiny, n_way=25, k_shot=1, k_query=1)  # 24 classes with rotations
    with pytest.raises(ValueError, match="n_way=7"):
        FewShotSampler(tiny, n_way=7, k_shot=1, k_query=1, rotations=False)
    FewShotSampler(tiny, n_way=24, k_shot=1, k_query=1)  # all classes is fine
    with pytest.raises(ValueError, match="k_shot=0"):
        FewShotSampler(tiny, n_way=2, k_shot=0, k_query=1)
    with pytest.raises(ValueError, match="n_way=0"):
        FewShotSampler(tiny, n_way=0, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="k_shot=5"):
        FewShotSampler(tiny, n_way=2, k_shot=5, k_query=3)  # 8 > 7 drawings
    with pytest.raises(ValueError, match="k_query=0"):
        FewShotSampler(tiny, n_way=2, k_shot=1, k_query=0)
    with pytest.raises(TypeError):
        FewShotSampler(tiny, 2, 1, 1)  # type: ignore[misc]


def test_sampler_speed() -> None:
    images = torch.randint(0, 256, (242, 20, 28, 28), dtype=torch.uint8)
    sampler = FewShotSampler(images, n_way=20, k_shot=1, k_query=15)
    rng = np.random.default_rng(0)
    sampler.sample(32, rng)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        sampler.sample(32, rng)
        times.append(time.perf_counter() - start)
    # typically ~5 ms; the bound is loose because the test machine is shared
    assert min(times) < 0.05, times
