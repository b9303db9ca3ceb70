"""Omniglot for N-way K-shot classification.

Three pieces:

* :func:`preprocess_images` turns file paths, PIL images, numpy arrays or torch tensors
  (dark ink on a light background) into float32 ``[N, 1, S, S]`` ink maps (ink = 1,
  background = 0). The dataset loader runs every training image through the very same
  code, so an image preprocessed at inference time matches the training data bit for bit.
* :class:`Omniglot` reads the official zips (or their extracted folders) straight from a data
  directory, de-duplicates characters by ``(alphabet, character)`` and holds out whole
  characters with :meth:`Omniglot.split`.
* :class:`FewShotSampler` draws batches of N-way K-shot tasks (:class:`FewShotBatch`) with
  vectorised index arithmetic; with ``rotations=True`` each rotation by 0/90/180/270 degrees of
  a character is a class of its own (MAML protocol, Finn et al. 2017).

Preprocessing, in order, for every image: convert to 8-bit grayscale ('L'; an alpha channel is
composited onto white first), pad to a square with white (centred; a no-op for Omniglot's square
105x105 images), resize to ``S x S`` with :data:`RESAMPLE` (Lanczos), then ``ink = (255 - gray)``
as uint8, and ``ink / 255`` as float32.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metarl.fewshot.batch import FewShotBatch

__all__ = [
    "EXPECTED_SOURCES",
    "RESAMPLE",
    "FewShotBatch",
    "FewShotSampler",
    "Omniglot",
    "OmniglotDataNotFound",
    "OmniglotSplits",
    "preprocess_images",
]

#: The resampling filter used for every resize (training data and user images alike).
RESAMPLE = Image.Resampling.LANCZOS

#: Names looked for in a data directory, in this order (earlier ones win on duplicates). Each
#: may be present as ``<name>.zip`` or as an extracted folder ``<name>/``.
EXPECTED_SOURCES: tuple[str, ...] = (
    "images_background",
    "images_evaluation",
    "images_background_small1",
    "images_background_small2",
)

OFFICIAL_LOCATION = (
    "the official zips are published in the Omniglot repository, "
    "github.com/brendenlake/omniglot (folder python/)"
)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

_VALID_ITEMS = (
    "a file path (str or pathlib.Path), a PIL image, or a numpy array / torch tensor of shape "
    "HxW, HxWx1, HxWx3 or HxWx4 (uint8 0..255, bool, or float in [0, 1])"
)


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def _ink_from_pil(img: Image.Image, image_size: int) -> np.ndarray:
    """One PIL image (any mode) -> uint8 ink map ``[S, S]`` (255 = ink, 0 = background)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        gray = Image.alpha_composite(white, rgba).convert("L")
    else:
        gray = img if img.mode == "L" else img.convert("L")
    w, h = gray.size
    if w != h:
        side = max(w, h)
        square = Image.new("L", (side, side), 255)
        square.paste(gray, ((side - w) // 2, (side - h) // 2))
        gray = square
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), RESAMPLE)
    return 255 - np.asarray(gray, dtype=np.uint8)


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    """A single HxW / HxWxC array (dark on light) -> PIL image."""
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] not in (3, 4):
            raise ValueError(f"{where}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(arr.shape)}")
    elif arr.ndim != 2:
        raise ValueError(f"{where}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{where}: empty image of shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        # Same convention as PIL's 1-bit mode (and np.asarray of an Omniglot PNG): True = white.
        u8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        u8 = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: float image holds NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"{where}: float images must lie in [0, 1] (1 = white), got values in [{lo:g}, {hi:g}]"
            )
        u8 = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer images must lie in 0..255, got values in [{lo}, {hi}]")
        u8 = arr.astype(np.uint8)
    else:
        raise ValueError(f"{where}: unsupported dtype {arr.dtype}; expected uint8, bool or float")
    return Image.fromarray(np.ascontiguousarray(u8))


def _open_path(path: str | os.PathLike, where: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{where}: no such image file: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: cannot read image file {p}: {exc}") from exc


def _ink_from_item(item: Any, image_size: int, where: str) -> np.ndarray:
    """One single-image item -> uint8 ink ``[S, S]``."""
    if isinstance(item, (str, os.PathLike)):
        return _ink_from_pil(_open_path(item, where), image_size)
    if isinstance(item, Image.Image):
        return _ink_from_pil(item, image_size)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return _ink_from_pil(_array_to_pil(item, where), image_size)
    raise ValueError(f"{where}: expected {_VALID_ITEMS}; got {type(item).__name__}")


def _is_stack(arr: np.ndarray | torch.Tensor) -> bool:
    """3-D arrays whose last axis is not a channel axis (1, 3, 4) are stacks ``[N, H, W]``;
    every 4-D array is a stack ``[N, H, W, C]`` or ``[N, 1, H, W]``."""
    return arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4))


def _ink_u8(images: Any, image_size: int) -> np.ndarray:
    """The shared core of :func:`preprocess_images` and :meth:`Omniglot.load`: uint8 ``[N, S, S]``."""
    image_size = _check_image_size(image_size)
    if isinstance(images, (np.ndarray, torch.Tensor)) and _is_stack(images):
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if arr.ndim == 4:
            if arr.shape[1] == 1 and arr.shape[-1] not in (1, 3, 4):
                arr = arr[:, 0]  # [N, 1, H, W]
            elif arr.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"images: a 4-D stack must be [N, H, W, C] with C in (1, 3, 4) or [N, 1, H, W], "
                    f"got shape {tuple(arr.shape)}"
                )
        items: Sequence[Any] = list(arr)
        label = "image"
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        items = [images]
        label = "image"
    elif isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        items = images
        label = "item"
        for i, item in enumerate(items):
            if isinstance(item, (np.ndarray, torch.Tensor)) and _is_stack(item):
                raise ValueError(
                    f"item {i}: got a stack of shape {tuple(item.shape)} inside a sequence; each item "
                    f"must be one image ({_VALID_ITEMS}); pass a stack as the whole input instead"
                )
    else:
        raise ValueError(
            f"images: expected one image or a sequence of images, each {_VALID_ITEMS}; "
            f"got {type(images).__name__}"
        )
    out = np.empty((len(items), image_size, image_size), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = _ink_from_item(item, image_size, f"{label} {i}")
    return out


def preprocess_images(images: Any, *, image_size: int = 28) -> torch.Tensor:
    """Turn dark-on-light images into ink maps, exactly as the Omniglot loader does.

    Args:
        images: one image or a sequence of images. An image is a file path (``str`` or
            ``pathlib.Path``), a PIL image (any mode), or a numpy array / torch tensor of
            shape ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` with dtype uint8
            (0..255), bool (True = white, as PIL's 1-bit mode) or float in ``[0, 1]``
            (1 = white). A single array/tensor of shape ``[N, H, W]`` (last axis not 1, 3 or 4),
            ``[N, H, W, C]`` or ``[N, 1, H, W]`` is a stack of N images. Images may have any
            size; an alpha channel is composited onto white.
        image_size: side S of the output images.

    Returns:
        float32 tensor ``[N, 1, S, S]`` in ``[0, 1]``: ink = 1, background = 0, i.e.
        ``(255 - gray) / 255`` with ``gray`` the 8-bit grayscale image after padding to a square
        with white and resizing with :data:`RESAMPLE`.

    Raises:
        FileNotFoundError: a path does not exist (names its index and the path).
        ValueError: an item has an unknown type, a wrong shape/dtype or range, or is not a
            readable image (names its index and what is accepted).
    """
    ink = _ink_u8(images, image_size)
    return torch.from_numpy(ink).to(torch.float32).div_(255.0).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


class OmniglotDataNotFound(FileNotFoundError):
    """No Omniglot data in the directory given to :meth:`Omniglot.load` (one-line message)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


def _not_found(root: Path, problem: str) -> OmniglotDataNotFound:
    expected = ", ".join(f"{name}.zip" for name in EXPECTED_SOURCES)
    err = OmniglotDataNotFound(
        _one_line(
            f"Omniglot data not found: {problem} {root}; expected one or more of {expected} "
            f"(or the same names as extracted folders holding <alphabet>/<character>/<drawing>.png); "
            f"{OFFICIAL_LOCATION}"
        )
    )
    err.root = root  # type: ignore[attr-defined]
    return err


@dataclass(frozen=True)
class _Source:
    path: Path
    is_zip: bool


def _find_sources(root: Path) -> list[_Source]:
    if not root.exists():
        raise _not_found(root, "no such directory")
    if not root.is_dir():
        raise _not_found(root, "not a directory:")
    found: list[_Source] = []
    for name in EXPECTED_SOURCES:
        zpath, dpath = root / f"{name}.zip", root / name
        if zpath.is_file():
            found.append(_Source(zpath, True))  # a zip wins over its extracted folder
        elif dpath.is_dir():
            found.append(_Source(dpath, False))
    if not found and root.name in EXPECTED_SOURCES:
        found.append(_Source(root, False))  # root is itself an extracted folder
    if not found:
        raise _not_found(root, "none of the expected files or folders in")
    return found


def _split_member(parts: Sequence[str]) -> tuple[str, str, str] | None:
    """``.../<alphabet>/<character>/<file>.png`` -> (alphabet, character, file), else None."""
    if len(parts) < 3 or not parts[-1].lower().endswith(".png"):
        return None
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return parts[-3], parts[-2], parts[-1]


def _signature(sources: list[_Source]) -> tuple:
    sig = []
    for s in sources:
        st = s.path.stat()
        sig.append((str(s.path), s.is_zip, st.st_size, st.st_mtime_ns))
    return tuple(sig)


_CACHE: dict[tuple[str, int], tuple[tuple, "Omniglot"]] = {}


class OmniglotSplits(NamedTuple):
    """Character-disjoint train/val/test split of an :class:`Omniglot` data set.

    ``train``/``val``/``test`` are image tensors ``[C_split, D, S, S]`` (same dtype as
    :attr:`Omniglot.images`); the ``*_characters`` lists name their characters, row by row.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_characters: list[tuple[str, str]]
    val_characters: list[tuple[str, str]]
    test_characters: list[tuple[str, str]]


@dataclass(frozen=True, eq=False)
class Omniglot:
    """Omniglot characters as ink images.

    Attributes:
        images: uint8 tensor ``[num_characters, D, S, S]`` (D = drawings per character, 20 for
            Omniglot): ink maps with 255 = ink, 0 = background. ``images.float() / 255`` is
            bit-identical to :func:`preprocess_images` of the source PNGs. Shared with the
            in-process cache: treat it as read-only.
        characters: ``(alphabet, character)`` per row of ``images``, sorted.
        image_size: S.
        sources: the zips/folders that were read, in reading order.
    """

    images: torch.Tensor
    characters: list[tuple[str, str]]
    image_size: int
    sources: tuple[str, ...] = ()

    @property
    def num_characters(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_drawings(self) -> int:
        """Drawings per character (D)."""
        return int(self.images.shape[1])

    @property
    def alphabets(self) -> list[str]:
        """Sorted distinct alphabet names."""
        return sorted({a for a, _ in self.characters})

    def __len__(self) -> int:
        return self.num_characters

    @classmethod
    def load(cls, root: str | os.PathLike, *, image_size: int = 28, cache: bool = True) -> Omniglot:
        """Read every Omniglot zip or extracted folder found in ``root``.

        Looks for ``<name>.zip`` or an extracted folder ``<name>/`` for each name in
        :data:`EXPECTED_SOURCES` (a zip wins over a folder of the same name; zips are read in
        place, never extracted). Characters are de-duplicated by ``(alphabet, character)``,
        first occurrence in :data:`EXPECTED_SOURCES` order winning; each character's drawings
        are sorted by file name and go through :func:`preprocess_images`' code path.

        Args:
            root: the data directory.
            image_size: side S of the stored images.
            cache: reuse the result of an earlier load of the same (resolved root, image_size)
                in this process, as long as the files found there are unchanged (size/mtime).

        Returns:
            An :class:`Omniglot` with ``images`` uint8 ``[num_characters, D, S, S]``.

        Raises:
            OmniglotDataNotFound: ``root`` is missing or holds none of the expected names.
            ValueError: a zip is corrupt, a source holds no images, an image is unreadable, or
                characters differ in their number of drawings (names the file/character).
        """
        image_size = _check_image_size(image_size)
        root = Path(root).expanduser().resolve()
        sources = _find_sources(root)
        key = (str(root), image_size)
        sig = _signature(sources)
        if cache and key in _CACHE and _CACHE[key][0] == sig:
            return _CACHE[key][1]
        data = cls._read(sources, image_size)
        if cache:
            _CACHE[key] = (sig, data)
        return data

    @classmethod
    def _read(cls, sources: list[_Source], image_size: int) -> Omniglot:
        # (alphabet, character) -> (source, sorted list of member names / file paths)
        chars: dict[tuple[str, str], tuple[_Source, list[str]]] = {}
        zips: dict[Path, zipfile.ZipFile] = {}
        try:
            for src in sources:
                local: dict[tuple[str, str], list[tuple[str, str]]] = {}
                if src.is_zip:
                    try:
                        zf = zipfile.ZipFile(src.path)
                    except (zipfile.BadZipFile, OSError, EOFError) as exc:
                        raise ValueError(f"corrupt Omniglot zip {src.path}: {exc}") from exc
                    zips[src.path] = zf
                    for info in zf.infolist():
                        if info.is_dir():
                            continue
                        split = _split_member(PurePosixPath(info.filename).parts)
                        if split is not None:
                            local.setdefault(split[:2], []).append((split[2], info.filename))
                else:
                    for dirpath, dirnames, filenames in os.walk(src.path):
                        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                        rel = Path(dirpath).relative_to(src.path).parts
                        for fname in filenames:
                            split = _split_member((*rel, fname))
                            if split is not None:
                                local.setdefault(split[:2], []).append(
                                    (split[2], os.path.join(dirpath, fname))
                                )
                if not local:
                    raise ValueError(
                        f"{src.path} holds no <alphabet>/<character>/<drawing>.png images "
                        f"(is it an Omniglot {'zip' if src.is_zip else 'folder'}?)"
                    )
                for key, files in local.items():
                    if key not in chars:  # first occurrence wins
                        chars[key] = (src, [ref for _, ref in sorted(files)])

            names = sorted(chars)
            counts = Counter(len(chars[k][1]) for k in names)
            expected_d = counts.most_common(1)[0][0]
            for k in names:
                n = len(chars[k][1])
                if n != expected_d:
                    raise ValueError(
                        f"character {k[0]}/{k[1]} in {chars[k][0].path} has {n} drawings, "
                        f"but the other characters have {expected_d}"
                    )

            out = np.empty((len(names), expected_d, image_size, image_size), dtype=np.uint8)
            for ci, k in enumerate(names):
                src, refs = chars[k]
                for di, ref in enumerate(refs):
                    if src.is_zip:
                        try:
                            raw = zips[src.path].read(ref)
                            with Image.open(io.BytesIO(raw)) as img:
                                img.load()
                                out[ci, di] = _ink_from_pil(img, image_size)
                        except (zipfile.BadZipFile, UnidentifiedImageError, OSError, EOFError,
                                SyntaxError, ValueError) as exc:
                            raise ValueError(f"corrupt Omniglot zip {src.path}: member {ref}: {exc}") from exc
                    else:
                        out[ci, di] = _ink_from_item(ref, image_size, f"file {ref}")
        finally:
            for zf in zips.values():
                zf.close()
        return cls(
            images=torch.from_numpy(out),
            characters=names,
            image_size=image_size,
            sources=tuple(str(s.path) for s in sources),
        )

    def split(self, *, num_val: int, num_test: int, seed: int = 0) -> OmniglotSplits:
        """Hold out whole characters.

        A permutation of the sorted character list drawn with ``numpy.random.default_rng(seed)``
        puts its first ``num_test`` characters in test, the next ``num_val`` in val and the rest in
        train; inside each split rows keep the sorted character order.

        Returns:
            :class:`OmniglotSplits` with image tensors ``[C_split, D, S, S]`` and character names.

        Raises:
            ValueError: negative counts, or ``num_val + num_test >= num_characters`` (train
                would be empty).
        """
        for name, value in (("num_val", num_val), ("num_test", num_test)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        c = self.num_characters
        if num_val + num_test >= c:
            raise ValueError(
                f"num_val={num_val} + num_test={num_test} = {num_val + num_test} leaves no training "
                f"characters out of {c}; need num_val + num_test < {c}"
            )
        perm = np.random.default_rng(seed).permutation(c)
        test_idx = np.sort(perm[:num_test])
        val_idx = np.sort(perm[num_test : num_test + num_val])
        train_idx = np.sort(perm[num_test + num_val :])

        def take(idx: np.ndarray) -> tuple[torch.Tensor, list[tuple[str, str]]]:
            return self.images[torch.from_numpy(idx)], [self.characters[i] for i in idx]

        (tr, trc), (va, vac), (te, tec) = take(train_idx), take(val_idx), take(test_idx)
        return OmniglotSplits(tr, va, te, trc, vac, tec)


# --------------------------------------------------------------------------------------------
# Task sampling
# --------------------------------------------------------------------------------------------


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return int(value)


def _random_prefix(rng: np.random.Generator, shape: tuple[int, ...], n: int, k: int) -> np.ndarray:
    """For every leading index, k distinct values of range(n) in uniformly random order.

    Draws one uniform key per candidate (``rng.random(shape + (n,))``) and keeps the k with the
    smallest keys, ordered by key. Returns int64 ``shape + (k,)``.
    """
    keys = rng.random((*shape, n))
    if k < n:
        idx = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    else:
        idx = np.broadcast_to(np.arange(n), keys.shape)
    order = np.argsort(np.take_along_axis(keys, idx, axis=-1), axis=-1)
    return np.take_along_axis(idx, order, axis=-1).astype(np.int64, copy=False)


class FewShotSampler:
    """N-way K-shot task sampler over ``images [C, D, S, S]`` (C characters x D drawings).

    With ``rotations=True`` the classes are ``(character, k)`` for k in 0..3, the images of
    class ``(c, k)`` being ``torch.rot90(images[c, d], k, dims=(-2, -1))``; class index
    ``4 * c + k``. With ``rotations=False`` the classes are the characters.

    ``images`` may be uint8 (0..255, divided by 255 on output, like :attr:`Omniglot.images`)
    or floating point (returned as float32 unchanged). With rotations the sampler keeps a
    table of all four rotations (4x the memory of ``images``; keep ``images`` uint8) so a batch
    is one gather per support/query set.
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        n_way: int,
        k_shot: int,
        k_query: int,
        rotations: bool = True,
    ) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images must be a tensor [C, D, S, S], got {shape}")
        if images.dtype == torch.uint8:
            self._scale: float | None = 255.0
        elif images.is_floating_point():
            images = images.to(torch.float32)
            self._scale = None
        else:
            raise ValueError(f"images must be uint8 or floating point, got dtype {images.dtype}")
        num_chars, num_drawings, h, w = images.shape
        if num_chars < 1 or num_drawings < 1 or h < 1 or w < 1:
            raise ValueError(f"images must be a non-empty tensor [C, D, S, S], got {tuple(images.shape)}")
        if rotations and h != w:
            raise ValueError(f"rotations=True needs square images, got {h}x{w}")
        self.n_way = _check_count("n_way", n_way)
        self.k_shot = _check_count("k_shot", k_shot)
        self.k_query = _check_count("k_query", k_query)
        self.rotations = bool(rotations)
        self.images = images.detach().cpu().contiguous()
        self.num_characters = int(num_chars)
        self.num_drawings = int(num_drawings)
        self.num_classes = self.num_characters * (4 if self.rotations else 1)
        if self.n_way > self.num_classes:
            raise ValueError(
                f"n_way={self.n_way} exceeds the number of classes, {self.num_classes} "
                f"({self.num_characters} characters{' x 4 rotations' if self.rotations else ''})"
            )
        if self.k_shot + self.k_query > self.num_drawings:
            raise ValueError(
                f"k_shot={self.k_shot} + k_query={self.k_query} = {self.k_shot + self.k_query} exceeds "
                f"the {self.num_drawings} drawings per class"
            )
        # Lookup table, row 4*c*D + k*D + d (rotations) or c*D + d: one gather per batch.
        if rotations:
            table = torch.stack([torch.rot90(self.images, r, dims=(-2, -1)) for r in range(4)], dim=1)
        else:
            table = self.images
        self._table = np.ascontiguousarray(table.reshape(-1, h, w).numpy())
        self._support_y = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        self._query_y = torch.arange(self.n_way).repeat_interleave(self.k_query)

    def __repr__(self) -> str:
        return (
            f"FewShotSampler(classes={self.num_classes}, drawings={self.num_drawings}, "
            f"n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, "
            f"rotations={self.rotations})"
        )

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """Table rows ``[T, n, k]`` -> float32 ``[T, n * k, 1, S, S]``.

        Done in numpy: single-threaded, so it does not slow down when torch's intra-op threads
        compete with other work for the cores (uint8 / 255 in numpy float32 is bit-identical to
        torch's ``.float() / 255`` for all 256 values).
        """
        t, n, k = rows.shape
        x = np.take(self._table, rows.reshape(-1), axis=0)  # fresh [T*n*k, S, S]
        if self._scale is not None:
            x = x.astype(np.float32)
            x /= np.float32(self._scale)
        return torch.from_numpy(x).view(t, n * k, 1, *x.shape[-2:])

    def sample(self, num_tasks: int, rng: np.random.Generator) -> FewShotBatch:
        """Draw ``num_tasks`` independent tasks using only ``rng``.

        Per task: ``n_way`` distinct classes labelled 0..n_way-1 in the order drawn, and per
        class ``k_shot + k_query`` distinct drawings (first k_shot -> support, rest -> query).

        Returns:
            :class:`FewShotBatch` with ``support_x`` float32 ``[T, n_way*k_shot, 1, S, S]``,
            ``support_y`` int64 ``[T, n_way*k_shot]``, ``query_x`` float32
            ``[T, n_way*k_query, 1, S, S]``, ``query_y`` int64 ``[T, n_way*k_query]``.
        """
        t = _check_count("num_tasks", num_tasks)
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        k_total = self.k_shot + self.k_query
        classes = _random_prefix(rng, (t,), self.num_classes, self.n_way)  # [T, n_way]
        draws = _random_prefix(rng, (t, self.n_way), self.num_drawings, k_total)  # [T, n_way, K]
        rows = classes[:, :, None] * self.num_drawings + draws
        support_x = self._gather(rows[..., : self.k_shot])
        query_x = self._gather(rows[..., self.k_shot :])
        return FewShotBatch(
            support_x=support_x,
            support_y=self._support_y.expand(t, -1).clone(),
            query_x=query_x,
            query_y=self._query_y.expand(t, -1).clone(),
        )
