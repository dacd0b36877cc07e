"""Parsers for the on-disk formats, each turning any malformed input into one :class:`DataError`.

- npz archives, read with ``allow_pickle=False``;
- IDX files (MNIST, Fashion-MNIST), gzip-compressed or raw, detected from the content;
- ``.amat`` text (static binarized MNIST), one image per line;
- CIFAR-10's python batches. These are pickles; they are read with :class:`NumpyOnlyUnpickler`,
  which resolves only the three numpy globals an array needs (see its docstring).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["read_npz", "read_idx", "read_amat", "NumpyOnlyUnpickler", "read_cifar_batch"]

_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the npz archive at ``path`` (no pickled objects allowed)."""
    # The file is opened here, not by np.load, which leaks its handle when the file is bad.
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise DataError(f"{path}: not a valid npz file (not a zip archive)")
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as archive:
                missing = [n for n in names if n not in archive.files]
                if missing:
                    raise DataError(f"{path}: missing array(s) {missing}; it holds {archive.files}")
                return {n: archive[n] for n in names}
        except _NPZ_ERRORS as exc:
            if "pickle" in str(exc):
                raise DataError(f"{path}: holds object arrays, which are never unpickled") from None
            raise DataError(f"{path}: truncated or not a valid npz file ({exc})") from None


def read_idx(path: Path) -> np.ndarray:
    """The uint8 images ``(N, H, W)`` of an IDX file (gzip-compressed or raw)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise DataError(f"{path}: IDX data type 0x{type_code:02x}, expected unsigned bytes (0x08)")
    if ndim != 3:
        raise DataError(f"{path}: IDX file has {ndim} dimensions, expected 3 (images, rows, columns)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">3I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes after the data"
        raise DataError(f"{path}: {what}: {len(raw)} bytes but its header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_amat(path: Path, n_cols: int) -> np.ndarray:
    """The uint8 rows ``(N, n_cols)`` of an ``.amat`` text file of 0/1 values (one row a line)."""
    lines = path.read_bytes().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = np.empty((len(lines), n_cols), dtype=np.uint8)
    for i, line in enumerate(lines):
        tokens = line.split()
        if len(tokens) != n_cols:
            raise DataError(f"{path}: line {i + 1} has {len(tokens)} values, expected {n_cols}")
        digits = b"".join(tokens)
        if len(digits) != n_cols:
            raise DataError(f"{path}: line {i + 1} has values other than 0 and 1")
        out[i] = np.frombuffer(digits, dtype=np.uint8)
    out -= ord("0")  # '0'/'1' -> 0/1; anything else wraps around to a value above 1
    if out.size and out.max() > 1:
        bad = int(np.argmax((out > 1).any(axis=1)))
        raise DataError(f"{path}: line {bad + 1} has values other than 0 and 1")
    return out


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    ``find_class`` is where a pickle names the callables it will run; this one resolves only
    ``numpy.ndarray``, ``numpy.dtype`` and numpy's array-reconstruction helper
    (``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct`` in numpy 2)
    and refuses every other name, so a hostile batch file cannot run code. Dicts, lists, strings,
    bytes and numbers need no ``find_class``. We chose this over a hand-written pickle parser
    because numpy's own ``__setstate__`` then does the array decoding.
    """

    _RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's _reconstruct, whatever its module
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_cifar_batch(data: bytes, where: str, row_size: int = 3072) -> np.ndarray:
    """The uint8 ``data`` array ``(N, row_size)`` of one pickled CIFAR batch (bytes of the file).

    ``where`` names the batch in error messages.
    """
    try:
        # latin1: the batches were written by Python 2; numpy needs its str arrays as latin1.
        batch = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
        MemoryError,
    ) as exc:
        raise DataError(f"{where}: not a valid CIFAR batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a valid CIFAR batch (expected a dict, got {type(batch).__name__})")
    array = batch.get("data", batch.get(b"data"))
    if not isinstance(array, np.ndarray):
        raise DataError(f"{where}: CIFAR batch has no 'data' array")
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != row_size:
        raise DataError(f"{where}: CIFAR 'data' is {array.dtype} {array.shape}, expected uint8 (N, {row_size})")
    return array
