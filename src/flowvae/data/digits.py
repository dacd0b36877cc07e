"""scikit-learn's bundled 8x8 digits, binarized: the no-download quick-start dataset.

1797 images with values 0..16, set to 1 where >= 8 and 0 elsewhere, shuffled with
``numpy.random.default_rng(seed)`` and split 1297/250/250. Kind ``'binary'``, shape (1, 8, 8).

The images are those of ``sklearn.datasets.load_digits``. To keep loading fast, its data file
(``sklearn/datasets/data/digits.csv.gz``) is read directly, which skips the second or so that
importing scikit-learn takes; ``load_digits`` itself is the fallback if the file is not there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .registry import DatasetSplits, register, shuffled_split

__all__ = ["load_digits", "digit_images"]

THRESHOLD = 8
N_IMAGES = 1797
N_VALID = 250
N_TEST = 250
IMAGE_SHAPE = (1, 8, 8)


def _bundled_csv() -> Path | None:
    """Path of scikit-learn's ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def digit_images() -> np.ndarray:
    """The 1797 digits as float64 ``(1797, 8, 8)`` with values 0..16."""
    path = _bundled_csv()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")  # 64 pixels, then the label
        if table.shape == (N_IMAGES, 65):
            return table[:, :-1].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits as sklearn_load_digits

    return sklearn_load_digits().images


@register("digits")
def load_digits(data_dir: Path, *, download: bool, seed: int) -> DatasetSplits:
    """Load the binarized digits; ``data_dir`` and ``download`` are unused (bundled data)."""
    images = (digit_images() >= THRESHOLD).astype(np.uint8)
    train, valid, test = shuffled_split(images, N_VALID, N_TEST, seed)
    return DatasetSplits.from_numpy("digits", "binary", train, valid, test, IMAGE_SHAPE)
