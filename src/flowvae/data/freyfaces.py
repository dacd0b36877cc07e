"""Frey Faces: 1965 grey-level faces of 28x20 pixels, kind ``'8bit'``, 1565/200/200.

Reads ``freyfaces.npz`` (array ``images``: uint8 ``(1965, 28, 20)``, SHA-256 checked) from the
data directory. The split is not fixed by the papers; like van den Berg et al. (2018) we shuffle
with ``numpy.random.default_rng(seed)`` and keep 200 images for validation and 200 for test.
The ``freyfaces.pkl`` file found in many VAE repositories is never unpickled here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import fetch
from .errors import DataError
from .formats import read_npz
from .registry import DatasetSplits, register, shuffled_split

__all__ = ["load_freyfaces"]

NPZ_NAME = "freyfaces.npz"
NPZ_SHA256: str | None = "3c70375e0a9c4751ad49ad5f1f692bd094c46f133cf4aa8ea77d1cb14e1efcd1"
N_IMAGES = 1965
N_VALID = 200
N_TEST = 200
IMAGE_SHAPE = (1, 28, 20)


@register("freyfaces")
def load_freyfaces(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load Frey Faces as uint8 ``(N, 1, 28, 20)``; ``download`` is unused (no public npz)."""
    path = data_dir / NPZ_NAME
    if not path.is_file() and (data_dir / "freyfaces.pkl").is_file():
        raise DataError(
            f"found {data_dir / 'freyfaces.pkl'} but flowvae never unpickles data files; convert it "
            f"once, in a Python session you trust, to {path} holding one uint8 array 'images' of "
            "shape (1965, 28, 20) (e.g. numpy.savez_compressed(path, images=...))"
        )
    if not path.is_file():
        raise DataError(
            f"{NPZ_NAME} not found in {data_dir}; it cannot be downloaded: place it there "
            "(array 'images', uint8, (1965, 28, 20))"
        )
    fetch(NPZ_NAME, data_dir, None, NPZ_SHA256, download=False)
    images = read_npz(path, ["images"])["images"]
    expected = (N_IMAGES, *IMAGE_SHAPE[1:])
    if images.shape != expected or images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' is {images.dtype} {images.shape}, expected uint8 {expected}")
    train, valid, test = shuffled_split(images, N_VALID, N_TEST, seed)
    return DatasetSplits.from_numpy("freyfaces", "8bit", train, valid, test, IMAGE_SHAPE)
