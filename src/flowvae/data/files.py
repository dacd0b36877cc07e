"""A user's own images: a folder of PNG/JPEG files, a ``.npy`` array or a ``.npz`` of arrays.

``load_path(path) -> DatasetSplits`` reads the images, finds their kind from their values (or takes
``kind``), checks every value, and splits them reproducibly when the file does not::

    folder/                     every *.png, *.jpg, *.jpeg below it (sorted), or the subfolders
                                train/ (and valid/, test/) when there is a train/
    images.npy                  one array: (N, H, W), (N, C, H, W), (N, H, W, C) or (N, H·W) square
    images.npz                  arrays train (and valid, test), or exactly one array of any name

Missing splits are cut from the training images with ``shuffled_split`` (``valid_fraction`` and
``test_fraction`` of them, shuffled by ``seed``).  The kind, when not given:

    values only 0 and 1                      'binary'     (Bernoulli likelihood)
    floats in [0, 1]                         'grayscale'  (probabilities, binarized afresh per batch)
    integers in 0..255 (any dtype)           '8bit'       (categorical / logistic likelihoods)

Image files are read as integers 0..255, so black-and-white images (only 0 and 255) are 'binary'
and any other image '8bit'; ``kind='grayscale'`` reads them as gray levels in [0, 1].  Every problem
is one :class:`DataError` naming the file and what is wrong.

Examples:
    >>> import numpy as np
    >>> from flowvae.data.files import splits_from_arrays
    >>> x = (np.random.default_rng(0).random((50, 8, 8)) > 0.5).astype(np.uint8)
    >>> splits_from_arrays(x, name="mine")
    DatasetSplits(name='mine', kind='binary', image_shape=(1, 8, 8), train/valid/test=40/5/5)
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .registry import DatasetSplits
from .values import describe_error, detect_kind, to_tensor

__all__ = [
    "ARRAYS",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "detect_kind",
    "is_data_path",
    "load_images_for",
    "load_path",
    "read_images",
    "splits_from_arrays",
    "to_tensor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "valid", "test")
ARRAY_SUFFIXES = (".npy", ".npz")
ARRAYS = "arrays"  # the dataset name of a run trained by flowvae.fit on arrays


def is_data_path(name: str) -> bool:
    """Whether ``--dataset`` names a path (a folder, ``.npy`` or ``.npz``) rather than a registered
    name.  A registered name wins over a folder of that name in the working directory (write
    ``./mnist`` for the folder)."""
    from .registry import available_datasets

    name = str(name)
    if "/" in name or name.lower().endswith(ARRAY_SUFFIXES):
        return True
    registered = name.strip().lower().replace("-", "_") in available_datasets()
    return not registered and Path(name).expanduser().is_dir()


# ------------------------------------------------------------------------------------------ reading


def read_images(path: str | Path) -> dict[str, np.ndarray]:
    """The raw arrays of ``path`` as ``{split: (N, C, H, W)}``; a file without splits gives ``{'all': x}``.

    Image files give uint8; arrays keep their dtype.  Raises :class:`DataError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return {"all": _as_images(_load_npy(path), path)}
    if suffix == ".npz":
        return _read_npz(path)
    raise DataError(f"{path}: give a folder of PNG/JPEG images, a .npy or a .npz file")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array ({describe_error(err)})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a .npy array, not a .npz archive; name it .npy")
            names = list(archive.files)
            if "train" in names:
                chosen = {s: s for s in SPLITS if s in names}
            elif len(names) == 1:
                chosen = {"all": names[0]}
            else:
                found = ", ".join(names) if names else "no arrays"
                raise DataError(f"{path} holds {found}; expected arrays train (valid, test) or exactly one array")
            arrays = {split: archive[key] for split, key in chosen.items()}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{path} is not a readable .npz archive ({describe_error(err)})") from None
    return {split: _as_images(x, path, split) for split, x in arrays.items()}


def _as_images(x: np.ndarray, path: Path, split: str | None = None) -> np.ndarray:
    """``x`` as (N, C, H, W) with C in {1, 3}; a one-line error for any other layout or dtype."""
    where = f"{path}" + (f" [{split}]" if split else "")
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{where}: images must be numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: images must be real numbers, got dtype {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{where} holds no images")
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise DataError(
                f"{where}: rows of {x.shape[1]} values are not square images; "
                "save the array as (N, H, W) or (N, C, H, W)"
            )
        return x.reshape(len(x), 1, side, side)
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(
        f"{where}: expected images (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3, got shape {x.shape}"
    )


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    if (folder / "train").is_dir():
        return {split: _read_image_files(folder / split) for split in SPLITS if (folder / split).is_dir()}
    return {"all": _read_image_files(folder)}


def _read_image_files(folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder} holds no PNG or JPEG images (*.png, *.jpg, *.jpeg)")
    images, first = [], None
    for path in files:
        try:
            with Image.open(path) as image:
                mode = image.mode
                if mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"):
                    gray = mode in ("1", "L", "LA") or (mode == "P" and _palette_is_gray(image))
                    pixels = np.asarray(image.convert("L" if gray else "RGB"))
                else:
                    raise DataError(
                        f"{path}: image mode {mode} (16-bit or floating point) is not supported; "
                        "save 8-bit grayscale or RGB images"
                    )
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path} is not a readable image ({describe_error(err)})") from None
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if first is None:
            first = (path, pixels.shape)
        elif pixels.shape != first[1]:
            raise DataError(
                f"{path} is {_describe(pixels.shape)} while {first[0]} is {_describe(first[1])}; "
                "all images must have one size and the same channels"
            )
        images.append(pixels)
    return np.stack(images)


def _palette_is_gray(image: Any) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _describe(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{w}x{h} {'grayscale' if c == 1 else 'RGB'}"


# ------------------------------------------------------------------------------------------ splits


def splits_from_arrays(
    train: Any,
    valid: Any = None,
    test: Any = None,
    *,
    kind: str | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    name: str = "arrays",
    from_images: bool = False,
) -> DatasetSplits:
    """:class:`DatasetSplits` of NumPy arrays or tensors (each (N, H, W), (N, C, H, W) or (N, H, W, C)).

    Missing ``valid``/``test`` are cut from ``train`` (``shuffled_split`` with ``seed``); ``kind``
    (default: detected from all the values) decides how they are read.  Raises :class:`DataError`."""
    given = {split: _numpy(x, name, split) for split, x in zip(SPLITS, (train, valid, test)) if x is not None}
    dtypes = {str(x.dtype) for x in given.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{s} {x.dtype}" for s, x in given.items())
        raise DataError(f"{name}: the splits have different dtypes ({listed}); give them all as one dtype")
    shapes = {s: x.shape[1:] for s, x in given.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"{name}: the splits have different image shapes "
            f"({', '.join(f'{s} {tuple(v)}' for s, v in shapes.items())})"
        )
    where = f"{name}"
    if kind is None:
        try:
            kind = detect_kind(np.concatenate([x.reshape(-1) for x in given.values()]), from_images=from_images)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    tensors = {
        s: to_tensor(x, kind, from_images=from_images, where=f"{where} [{s}]" if len(given) > 1 else where)
        for s, x in given.items()
    }
    missing = [s for s in ("valid", "test") if s not in tensors]
    if missing:
        fractions = {"valid": valid_fraction, "test": test_fraction}
        check_fractions(valid_fraction, test_fraction)
        n = len(tensors["train"])
        counts = {s: round(n * fractions[s]) if s in missing else 0 for s in ("valid", "test")}
        if any(counts[s] < 1 for s in missing) or n - counts["valid"] - counts["test"] < 1:
            raise DataError(
                f"{where}: {n} images are too few to split off {' and '.join(missing)} "
                f"(valid_fraction {valid_fraction}, test_fraction {test_fraction})"
            )
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        rest, cut = order[: n - counts["valid"] - counts["test"]], order[n - counts["valid"] - counts["test"] :]
        pool = tensors["train"]
        tensors["train"] = pool[rest]
        if "valid" in missing:
            tensors["valid"], cut = pool[cut[: counts["valid"]]], cut[counts["valid"] :]
        if "test" in missing:
            tensors["test"] = pool[cut]
    return DatasetSplits(name, tensors["train"], tensors["valid"], tensors["test"], kind)


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for flag, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
            raise DataError(f"{flag} must be in (0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1:
        raise DataError(f"valid_fraction + test_fraction must be below 1, got {valid_fraction + test_fraction:g}")


def _numpy(x: Any, name: str, split: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as err:
            raise DataError(f"{name} [{split}]: not an array of images ({describe_error(err)})") from None
    return _as_images(x, Path(name), split)


def load_path(
    path: str | Path, *, kind: str | None = None, valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits:
    """The images of ``path`` (a folder, ``.npy`` or ``.npz``) as checked train/valid/test splits."""
    path = Path(path).expanduser()
    arrays = read_images(path)
    from_images = path.is_dir()
    train = arrays.get("train", arrays.get("all"))
    try:
        return splits_from_arrays(
            train,
            arrays.get("valid"),
            arrays.get("test"),
            kind=kind,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            seed=seed,
            name=str(path),
            from_images=from_images,
        )
    except DataError as err:
        if str(err).startswith(str(path)):
            raise
        raise DataError(f"{path}: {err}") from None


def load_images_for(path: str | Path, kind: str, image_shape: tuple[int, ...], split: str = "test") -> torch.Tensor:
    """The images of ``path`` to score against a trained run of ``kind`` and ``image_shape``: the
    ``split`` of a file with splits, else all of it.  A shape or kind mismatch is a :class:`DataError`."""
    path = Path(path).expanduser()
    arrays = read_images(path)
    if "all" in arrays:
        x = arrays["all"]
    elif split in arrays:
        x = arrays[split]
    else:
        raise DataError(f"{path} has no {split} split (it has {', '.join(arrays)})")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"{path} holds images of shape {tuple(x.shape[1:])} (C, H, W) but the run was trained on "
            f"{tuple(image_shape)}"
        )
    try:
        return to_tensor(x, kind, from_images=path.is_dir(), where=str(path))
    except DataError as err:
        raise DataError(f"{err} (the run was trained on {kind} data)") from None
