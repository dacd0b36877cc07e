"""The values of images: which data kind they are, and their checked tensor for a kind.

    values only 0 and 1                      'binary'     float32 in {0, 1}
    floats in [0, 1]                         'grayscale'  float32 in [0, 1]
    integers 0..255 (any dtype)              '8bit'       uint8

Image files are read as integers 0..255: with ``from_images``, pixels that are only 0 and 255
(black and white) are 'binary' too, and gray levels become [0, 1] for 'grayscale'.  Every problem is
one :class:`~flowvae.data.DataError` naming the first odd value and its image.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError

__all__ = ["KINDS", "describe_error", "detect_kind", "to_tensor"]

KINDS = ("binary", "grayscale", "8bit")


def describe_error(err: BaseException) -> str:
    """An exception's message on one line, at most 120 characters."""
    text = " ".join(str(err).split())
    return (text[:120] + "…") if len(text) > 120 else (text or type(err).__name__)


def detect_kind(x: np.ndarray, *, from_images: bool = False) -> str:
    """The data kind that ``x``'s values say (see the module docstring); raises :class:`DataError`
    for values that fit none."""
    _check_finite(x, "the data")
    if x.dtype == bool:
        return "binary"
    low, high = x.min(), x.max()
    if np.issubdtype(x.dtype, np.integer) or (np.mod(x, 1) == 0).all():
        values = np.unique(x) if high - low <= 255 else None
        if values is not None and set(values.tolist()) <= {0, 1}:
            return "binary"
        if from_images and values is not None and set(values.tolist()) <= {0, 255}:
            return "binary"
        if low >= 0 and high <= 255:
            return "8bit"
    if np.issubdtype(x.dtype, np.floating) and low >= 0 and high <= 1:
        return "grayscale"
    raise DataError(
        f"values from {low} to {high} fit no data kind: give 0/1 (binary), floats in [0, 1] "
        "(grayscale) or integers 0..255 (8bit)"
    )


def _check_finite(x: np.ndarray, where: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = "NaN" if np.isnan(x).any() else "infinite"
        raise DataError(f"{where} holds {bad} values")


def to_tensor(x: np.ndarray, kind: str, *, from_images: bool = False, where: str = "the data") -> torch.Tensor:
    """``x`` (N, C, H, W) as the tensor of ``kind`` (float32 for 'binary'/'grayscale', uint8 for
    '8bit'), every value checked.  Integers are gray levels 0..255 for 'grayscale' (integer arrays of
    only 0 and 1 are read as 0 and 1), and image files' 0/255 pixels are 0/1 for 'binary'."""
    if kind not in KINDS:
        raise DataError(f"data kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_finite(x, where)
    integral = x.dtype == bool or np.issubdtype(x.dtype, np.integer)
    if kind == "binary":
        if from_images:
            x = x // 255 if set(np.unique(x).tolist()) <= {0, 255} else x
        if not ((x == 0) | (x == 1)).all():
            raise DataError(
                f"{where}: kind binary needs values 0 and 1 only, found {_odd_value(x, (x != 0) & (x != 1))}"
            )
        return torch.from_numpy(x.astype(np.float32))
    if kind == "grayscale":
        if integral and not from_images and x.min() >= 0 and x.max() <= 1:
            return torch.from_numpy(x.astype(np.float32))  # 0/1 arrays: probabilities 0 and 1, not gray levels
        if integral:
            if x.min() < 0 or x.max() > 255:
                raise DataError(
                    f"{where}: kind grayscale needs integers 0..255 or floats in [0, 1], "
                    f"found {_odd_value(x, (x < 0) | (x > 255))}"
                )
            return torch.from_numpy(x.astype(np.float32) / 255.0)
        if x.min() < 0 or x.max() > 1:
            raise DataError(
                f"{where}: kind grayscale needs floats in [0, 1] (or integers 0..255), "
                f"found {_odd_value(x, (x < 0) | (x > 1))}"
            )
        return torch.from_numpy(x.astype(np.float32))
    if not integral and not (np.mod(x, 1) == 0).all():
        raise DataError(
            f"{where}: kind 8bit needs integers 0..255, found the non-integer {_odd_value(x, np.mod(x, 1) != 0)}"
        )
    if x.min() < 0 or x.max() > 255:
        raise DataError(f"{where}: kind 8bit needs integers 0..255, found {_odd_value(x, (x < 0) | (x > 255))}")
    return torch.from_numpy(x.astype(np.uint8))


def _odd_value(x: np.ndarray, mask: np.ndarray) -> str:
    index = np.argwhere(mask)[0]
    return f"{x[tuple(index)].item()!r} (image {index[0]})"
