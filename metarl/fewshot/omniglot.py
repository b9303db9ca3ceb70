"""Omniglot for N-way K-shot classification.

Two pieces (images become ink maps with :func:`metarl.fewshot.images.preprocess_images`, the
same code for training data and user images):

* :class:`Omniglot` reads the official zips (or their extracted folders) straight from a data
  directory, de-duplicates characters by ``(alphabet, character)`` and holds out whole
  characters with :meth:`Omniglot.split`, or whole alphabets with :meth:`Omniglot.split_alphabets`
  (Lake et al.'s one-shot protocol: evaluation on alphabets never seen in training).
* :class:`~metarl.fewshot.tasks.FewShotSampler` draws batches of N-way K-shot tasks (:class:`FewShotBatch`) with
  vectorised index arithmetic; with ``rotations=True`` each rotation by 0/90/180/270 degrees of
  a character is a class of its own (MAML protocol, Finn et al. 2017).
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

from metarl.fewshot.images import check_image_size, ink_from_item, ink_from_pil

__all__ = [
    "EXPECTED_SOURCES",
    "Omniglot",
    "OmniglotDataNotFound",
    "OmniglotSplits",
]

#: Names looked for in a data directory, in this order (earlier ones win on duplicates). Each
#: may be present as ``<name>.zip`` or as an extracted folder ``<name>/``.
EXPECTED_SOURCES: tuple[str, ...] = (
    "images_background",
    "images_evaluation",
    "images_background_small1",
    "images_background_small2",
)

OFFICIAL_LOCATION = (
    "the official zips are published in the Omniglot repository, github.com/brendenlake/omniglot (folder python/)"
)


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


_CACHE: dict[tuple[str, int], tuple[tuple, Omniglot]] = {}


class OmniglotSplits(NamedTuple):
    """Character-disjoint train/val/test split of an :class:`Omniglot` data set (alphabet-disjoint
    too when made by :meth:`Omniglot.split_alphabets`).

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

    @property
    def alphabet_sizes(self) -> dict[str, int]:
        """Characters per alphabet, in sorted alphabet order."""
        counts = Counter(a for a, _ in self.characters)
        return {a: counts[a] for a in sorted(counts)}

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
        image_size = check_image_size(image_size)
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
                                local.setdefault(split[:2], []).append((split[2], os.path.join(dirpath, fname)))
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
                                out[ci, di] = ink_from_pil(img, image_size)
                        except (
                            zipfile.BadZipFile,
                            UnidentifiedImageError,
                            OSError,
                            EOFError,
                            SyntaxError,
                            ValueError,
                        ) as exc:
                            raise ValueError(f"corrupt Omniglot zip {src.path}: member {ref}: {exc}") from exc
                    else:
                        out[ci, di] = ink_from_item(ref, image_size, f"file {ref}")
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
        _check_split_counts(num_val, num_test)
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
        return self._take(train_idx, val_idx, test_idx)

    def split_alphabets(self, *, num_val: int, num_test: int, seed: int = 0) -> OmniglotSplits:
        """Hold out whole alphabets: no alphabet (hence no character) is in two splits.

        A permutation of the sorted alphabet names (:attr:`alphabets`) drawn with
        ``numpy.random.default_rng(seed)`` puts its first ``num_test`` alphabets in test, the next
        ``num_val`` in val and the rest in train; each split holds every character of its alphabets,
        rows in the sorted character order (so an alphabet's characters are adjacent rows).

        Returns:
            :class:`OmniglotSplits` with image tensors ``[C_split, D, S, S]`` and character names.

        Raises:
            ValueError: negative counts, or ``num_val + num_test >= num_alphabets`` (train would be
                empty).
        """
        _check_split_counts(num_val, num_test)
        names = self.alphabets
        if num_val + num_test >= len(names):
            raise ValueError(
                f"num_val={num_val} + num_test={num_test} = {num_val + num_test} alphabets leaves no training "
                f"alphabet out of {len(names)} ({', '.join(names)}); need num_val + num_test < {len(names)}"
            )
        perm = np.random.default_rng(seed).permutation(len(names))
        split_of = {names[i]: 2 for i in perm[:num_test]}
        split_of.update({names[i]: 1 for i in perm[num_test : num_test + num_val]})
        which = np.array([split_of.get(a, 0) for a, _ in self.characters], dtype=np.int64)
        return self._take(*(np.flatnonzero(which == s) for s in (0, 1, 2)))

    def _take(self, train_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray) -> OmniglotSplits:
        """The splits made of the given (sorted) character rows."""

        def take(idx: np.ndarray) -> tuple[torch.Tensor, list[tuple[str, str]]]:
            return self.images[torch.from_numpy(idx)], [self.characters[i] for i in idx]

        (tr, trc), (va, vac), (te, tec) = take(train_idx), take(val_idx), take(test_idx)
        return OmniglotSplits(tr, va, te, trc, vac, tec)


def _check_split_counts(num_val: Any, num_test: Any) -> None:
    for name, value in (("num_val", num_val), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
