"""N-way K-shot classification tasks drawn from a set of characters (:class:`FewShotSampler`).

Tasks come in batches (:class:`~metarl.fewshot.batch.FewShotBatch`) drawn with vectorised
index arithmetic; with ``rotations=True`` each rotation by 0/90/180/270 degrees of a character
is a class of its own (MAML protocol, Finn et al. 2017).

Given each character's alphabet, the sampler draws *within-alphabet* tasks (the one-shot protocol
of Lake et al. 2015, where a task's characters look alike): per task one alphabet, uniformly among
the set's alphabets, one rotation k (uniform over 0..3 with ``rotations=True``, else 0) and
``n_way`` distinct characters of that alphabet, all rotated by k. A rotated alphabet is thus an
alphabet of its own and a task never mixes orientations (which would make its classes easy to tell
apart); an alphabet hosts an N-way task when it has at least N characters, rotations or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metarl.fewshot.batch import FewShotBatch


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


def _random_subset_of_prefix(rng: np.random.Generator, sizes: np.ndarray, width: int, k: int) -> np.ndarray:
    """Per row i, k distinct values of range(sizes[i]) (every sizes[i] >= k) in uniformly random order.

    Draws one uniform key per position of ``range(width)`` (``rng.random((len(sizes), width))``),
    excludes the positions >= sizes[i] and keeps the k smallest keys, ordered by key. Returns
    int64 ``[len(sizes), k]``.
    """
    keys = rng.random((len(sizes), width))
    keys[np.arange(width)[None, :] >= sizes[:, None]] = np.inf
    idx = np.argpartition(keys, k - 1, axis=-1)[..., :k]
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

    ``alphabets`` (one name per character row of ``images``) switches to within-alphabet tasks
    (module docstring): every task's ``n_way`` classes are characters of one alphabet, at one
    rotation. Every alphabet given must have at least ``n_way`` characters (``ValueError`` naming
    those that do not).
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        n_way: int,
        k_shot: int,
        k_query: int,
        rotations: bool = True,
        alphabets: Sequence[str] | None = None,
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
        self.within_alphabet = alphabets is not None
        self.alphabets: list[str] | None = None  # within-alphabet: the sorted alphabet names
        if alphabets is not None:
            self._init_alphabets(list(alphabets))
        # Lookup table, row 4*c*D + k*D + d (rotations) or c*D + d: one gather per batch.
        if rotations:
            table = torch.stack([torch.rot90(self.images, r, dims=(-2, -1)) for r in range(4)], dim=1)
        else:
            table = self.images
        self._table = np.ascontiguousarray(table.reshape(-1, h, w).numpy())
        self._support_y = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        self._query_y = torch.arange(self.n_way).repeat_interleave(self.k_query)

    def _init_alphabets(self, alphabets: list[str]) -> None:
        """Group the character rows by alphabet: names, sizes and a padded row table."""
        if len(alphabets) != self.num_characters or not all(isinstance(a, str) for a in alphabets):
            raise ValueError(
                f"alphabets must name the alphabet of each of the {self.num_characters} characters, "
                f"got {len(alphabets)} entries"
            )
        names = sorted(set(alphabets))
        rows = {name: [] for name in names}
        for c, name in enumerate(alphabets):
            rows[name].append(c)
        small = [f"{name} ({len(rows[name])} characters)" for name in names if len(rows[name]) < self.n_way]
        if small:
            note = " (a task keeps one rotation, so rotations add no classes to an alphabet)" if self.rotations else ""
            raise ValueError(
                f"n_way={self.n_way} within-alphabet tasks need at least {self.n_way} characters per alphabet; "
                f"too small: {', '.join(small)}{note}"
            )
        self.alphabets = names
        self._alphabet_sizes = np.array([len(rows[n]) for n in names], dtype=np.int64)
        width = int(self._alphabet_sizes.max())
        self._alphabet_rows = np.zeros((len(names), width), dtype=np.int64)  # [A, max size], padded with 0
        for i, name in enumerate(names):
            self._alphabet_rows[i, : len(rows[name])] = rows[name]

    def __repr__(self) -> str:
        within = f", alphabets={len(self.alphabets)}" if self.alphabets is not None else ""
        return (
            f"FewShotSampler(classes={self.num_classes}, drawings={self.num_drawings}, "
            f"n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, "
            f"rotations={self.rotations}{within})"
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

        Per task: ``n_way`` distinct classes labelled 0..n_way-1 in the order drawn (within-alphabet:
        an alphabet, a rotation, then ``n_way`` distinct characters of it), and per class
        ``k_shot + k_query`` distinct drawings (first k_shot -> support, rest -> query).

        Returns:
            :class:`FewShotBatch` with ``support_x`` float32 ``[T, n_way*k_shot, 1, S, S]``,
            ``support_y`` int64 ``[T, n_way*k_shot]``, ``query_x`` float32
            ``[T, n_way*k_query, 1, S, S]``, ``query_y`` int64 ``[T, n_way*k_query]``.
        """
        t = _check_count("num_tasks", num_tasks)
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        k_total = self.k_shot + self.k_query
        if self.within_alphabet:
            alphabet = rng.integers(len(self._alphabet_sizes), size=t)  # [T]
            rotation = rng.integers(4, size=t) if self.rotations else np.zeros(t, dtype=np.int64)  # [T]
            sizes = self._alphabet_sizes[alphabet]
            picks = _random_subset_of_prefix(rng, sizes, self._alphabet_rows.shape[1], self.n_way)  # [T, n_way]
            chars = np.take_along_axis(self._alphabet_rows[alphabet], picks, axis=-1)
            classes = chars * 4 + rotation[:, None] if self.rotations else chars  # [T, n_way]
        else:
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
