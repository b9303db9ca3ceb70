"""Images to Omniglot-style ink maps: the preprocessing of the training data and of user images alike.

:func:`preprocess_images` turns file paths, PIL images, numpy arrays or torch tensors (dark ink
on a light background) into float32 ``[N, 1, S, S]`` ink maps (ink = 1, background = 0). For
every image, in order: convert to 8-bit grayscale ('L'; an alpha channel is composited onto
white first), pad to a square with white (centred), resize to ``S x S`` with :data:`RESAMPLE`
(Lanczos), then ``ink = (255 - gray)`` as uint8, and ``ink / 255`` as float32. The Omniglot
loader runs every training image through the same code, so an image preprocessed at inference
time matches the training data bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: The resampling filter used for every resize (training data and user images alike).
RESAMPLE = Image.Resampling.LANCZOS


_VALID_ITEMS = (
    "a file path (str or pathlib.Path), a PIL image, or a numpy array / torch tensor of shape "
    "HxW, HxWx1, HxWx3 or HxWx4 (uint8 0..255, bool, or float in [0, 1])"
)


def check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def ink_from_pil(img: Image.Image, image_size: int) -> np.ndarray:
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
            raise ValueError(f"{where}: float images must lie in [0, 1] (1 = white), got values in [{lo:g}, {hi:g}]")
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


def ink_from_item(item: Any, image_size: int, where: str) -> np.ndarray:
    """One single-image item -> uint8 ink ``[S, S]``."""
    if isinstance(item, (str, os.PathLike)):
        return ink_from_pil(_open_path(item, where), image_size)
    if isinstance(item, Image.Image):
        return ink_from_pil(item, image_size)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return ink_from_pil(_array_to_pil(item, where), image_size)
    raise ValueError(f"{where}: expected {_VALID_ITEMS}; got {type(item).__name__}")


def _is_stack(arr: np.ndarray | torch.Tensor) -> bool:
    """3-D arrays whose last axis is not a channel axis (1, 3, 4) are stacks ``[N, H, W]``;
    every 4-D array is a stack ``[N, H, W, C]`` or ``[N, 1, H, W]``."""
    return arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4))


def _ink_u8(images: Any, image_size: int) -> np.ndarray:
    """The shared core of :func:`preprocess_images` and :meth:`Omniglot.load`: uint8 ``[N, S, S]``."""
    image_size = check_image_size(image_size)
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
            f"images: expected one image or a sequence of images, each {_VALID_ITEMS}; got {type(images).__name__}"
        )
    out = np.empty((len(items), image_size, image_size), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = ink_from_item(item, image_size, f"{label} {i}")
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
