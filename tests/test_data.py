"""Tests for flowvae.data.

Every loader is exercised on tiny files written into ``tmp_path``. The loaders enforce the real
split sizes and checksums, which are module constants (``SPLIT_ROWS``, ``TRAIN_FILE_ROWS``,
``NPZ_SHA256``, ...); the tests shrink the sizes and swap the checksums with ``monkeypatch``.
Downloads go to ``file://`` URLs; nothing touches the network. The real files in
``../shared/data`` (and the Fashion-MNIST Debian package) are loaded when present.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowvae.data import (
    DataError,
    DatasetSplits,
    available_datasets,
    binarized_mnist,
    cifar10,
    default_data_dir,
    fashion_mnist,
    freyfaces,
    load_dataset,
    mnist,
)
from flowvae.data.cache import download, fetch, sha256_of
from flowvae.data.formats import read_cifar_batch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- file builders


def write_idx(path: Path, images: np.ndarray, *, compress: bool) -> Path:
    """Write uint8 images (N, H, W) as an IDX file."""
    raw = struct.pack(">BBBB3I", 0, 0, 0x08, 3, *images.shape) + images.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_amat(path: Path, rows: np.ndarray) -> Path:
    path.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows))
    return path


def cifar_tarball(path: Path, batches: dict[str, bytes]) -> Path:
    """Write a tar.gz holding ``cifar-10-batches-py/<name>`` for each batch."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def py2_pickle(data: np.ndarray) -> bytes:
    """A CIFAR batch pickled the way Python 2 and numpy 1 wrote the real ones (protocol 2).

    Strings are py2 ``str`` opcodes (read back as latin1) and the array is rebuilt through
    ``numpy.core.multiarray._reconstruct``, exactly as in ``cifar-10-python.tar.gz``.
    """

    def string(b: bytes) -> bytes:  # SHORT_BINSTRING or BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(n: int) -> bytes:  # BININT1 or BININT2
        return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n)

    rows, cols = data.shape
    return b"".join(
        [
            b"\x80\x02}(",
            string(b"batch_label"),
            string(b"training batch"),
            string(b"labels"),
            b"](",
            integer(3),
            integer(4),
            b"e",
            string(b"data"),
            b"cnumpy.core.multiarray\n_reconstruct\n",
            b"cnumpy\nndarray\n",
            integer(0),
            b"\x85",
            string(b"b"),
            b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
            b"(",
            integer(1),
            integer(rows),
            integer(cols),
            b"\x86",  # state: version, shape,
            b"cnumpy\ndtype\n",
            string(b"u1"),
            integer(0),
            integer(1),
            b"\x87R",  # dtype('u1'),
            b"(",
            integer(3),
            string(b"|"),
            b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff",
            integer(0),
            b"tb",
            b"\x89",
            string(data.tobytes()),
            b"tb",  # not Fortran-ordered, raw bytes
            b"u.",
        ]
    )


def cifar_batch(n: int, offset: int) -> bytes:
    return py2_pickle(((np.arange(n * 3072) + offset) % 256).astype(np.uint8).reshape(n, 3072))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_splits(
    s: DatasetSplits,
    kind: str,
    shape: tuple[int, int, int],
    sizes: tuple[int, int, int],
) -> None:
    assert isinstance(s, DatasetSplits)
    assert s.kind == kind
    assert s.image_shape == shape
    assert s.dim == shape[0] * shape[1] * shape[2]
    assert (len(s.train), len(s.valid), len(s.test)) == sizes
    dtype = torch.uint8 if kind == "8bit" else torch.float32
    for t in (s.train, s.valid, s.test):
        assert t.dtype == dtype and tuple(t.shape[1:]) == shape
        if kind == "binary":
            assert bool(((t == 0) | (t == 1)).all())
        elif kind == "grayscale":
            assert t.numel() == 0 or (t.min() >= 0 and t.max() <= 1)


def no_temp_files(directory: Path) -> bool:
    return not any(p.name.endswith(".part") for p in directory.iterdir())


# ---------------------------------------------------------------------------- registry, splits


def test_available_and_unknown_name() -> None:
    names = available_datasets()
    assert {"binarized_mnist", "mnist", "fashion_mnist", "freyfaces", "digits", "cifar10"} <= set(names)
    with pytest.raises(ValueError, match="binarized_mnist.*cifar10"):
        load_dataset("imagenet")


def test_dataset_splits_properties_and_validation() -> None:
    x = torch.zeros(3, 1, 4, 5)
    s = DatasetSplits("toy", x, x[:1], x[:2], "binary")
    assert s.image_shape == (1, 4, 5) and s.dim == 20
    assert "toy" in repr(s)
    with pytest.raises(AttributeError):
        s.kind = "8bit"  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind"):
        DatasetSplits("toy", x, x, x, "color")
    with pytest.raises(ValueError, match="image shapes"):
        DatasetSplits("toy", x, torch.zeros(1, 1, 4, 4), x, "binary")
    with pytest.raises(ValueError, match="uint8"):
        DatasetSplits("toy", x, x, x, "8bit")


def test_default_data_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWVAE_DATA", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("FLOWVAE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "flowvae"


def test_load_dataset_uses_env_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWVAE_DATA", str(tmp_path))
    monkeypatch.setattr(freyfaces, "NPZ_SHA256", None)
    monkeypatch.setattr(freyfaces, "N_IMAGES", 10)
    monkeypatch.setattr(freyfaces, "N_VALID", 2)
    monkeypatch.setattr(freyfaces, "N_TEST", 3)
    np.savez(tmp_path / "freyfaces.npz", images=np.zeros((10, 28, 20), np.uint8))
    assert_splits(load_dataset("freyfaces"), "8bit", (1, 28, 20), (5, 2, 3))


# ---------------------------------------------------------------------------- cache


def test_download_file_url_caches(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello flowvae" * 1000)
    digest = sha256_of(src)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch("data.bin", cache, src.as_uri(), digest, download=True)
    assert path == cache / "data.bin" and path.read_bytes() == src.read_bytes()
    assert no_temp_files(cache)
    src.unlink()  # a second fetch must use the cached copy
    assert fetch("data.bin", cache, src.as_uri(), digest, download=False) == path


def test_download_md5_checksum(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    dest = download(src.as_uri(), tmp_path / "out" / "x.bin", "md5:" + hashlib.md5(b"abc").hexdigest())
    assert dest.read_bytes() == b"abc"


def test_download_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"x.bin.*{wrong}.*{sha256_of(src)}"):
        fetch("x.bin", cache, src.as_uri(), wrong, download=True)
    assert not (cache / "x.bin").exists()
    assert not cache.exists()  # nor the directory the failed download created (issue 27)


def test_download_network_failure(tmp_path: Path) -> None:
    url = (tmp_path / "does-not-exist.bin").as_uri()
    with pytest.raises(DataError, match="could not download.*does-not-exist.*place it"):
        fetch("x.bin", tmp_path / "cache", url, None, download=True)
    assert not (tmp_path / "cache").exists()  # nothing: no file, no temporary, no directory (issue 27)


def test_fetch_tries_mirrors(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"mirror")
    bad = (tmp_path / "missing.bin").as_uri()
    path = fetch("x.bin", tmp_path / "cache", [bad, src.as_uri()], sha256_of(src), download=True)
    assert path.read_bytes() == b"mirror"


def test_fetch_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"x\.bin not found in {tmp_path}.*http://example\.org/x\.bin"):
        fetch("x.bin", tmp_path, "http://example.org/x.bin", None, download=False)
    (tmp_path / "x.bin").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        fetch("x.bin", tmp_path, "http://example.org/x.bin", "1" * 64, download=False)


# ---------------------------------------------------------------------------- binarized MNIST


@pytest.fixture
def small_bmnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    rows = {"train": 6, "valid": 3, "test": 2}
    monkeypatch.setattr(binarized_mnist, "SPLIT_ROWS", rows)
    monkeypatch.setattr(binarized_mnist, "NPZ_SHA256", None)
    return rows


def bmnist_arrays(rows: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s: (rng.random((n, 784)) < 0.3).astype(np.uint8) for s, n in rows.items()}


def test_binarized_mnist_npz(tmp_path: Path, small_bmnist: dict[str, int]) -> None:
    arrays = bmnist_arrays(small_bmnist)
    np.savez_compressed(tmp_path / "binarized_mnist.npz", **arrays)
    s = load_dataset("binarized_mnist", tmp_path, download=False)
    assert_splits(s, "binary", (1, 28, 28), (6, 3, 2))
    assert torch.equal(s.valid.reshape(3, 784), torch.from_numpy(arrays["valid"]).float())


def test_binarized_mnist_npz_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "binarized_mnist.npz", **bmnist_arrays({"train": 2, "valid": 1, "test": 1}))
    with pytest.raises(DataError, match="binarized_mnist.npz: corrupt"):
        load_dataset("binarized_mnist", tmp_path, download=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(train=a["train"][:, :783]), "shape"),
        (lambda a: a.update(test=a["test"] * 2), "values other than 0 and 1"),
        (lambda a: a.update(valid=a["valid"].astype(np.float32)), "dtype"),
        (lambda a: a.pop("test"), "missing array"),
    ],
)
def test_binarized_mnist_npz_bad_arrays(
    tmp_path: Path,
    small_bmnist: dict[str, int],
    change,
    message: str,
) -> None:
    arrays = bmnist_arrays(small_bmnist)
    change(arrays)
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset("binarized_mnist", tmp_path, download=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "npy"])
def test_binarized_mnist_npz_corrupt(
    tmp_path: Path,
    small_bmnist: dict[str, int],
    damage: str,
) -> None:
    path = tmp_path / "binarized_mnist.npz"
    np.savez_compressed(path, **bmnist_arrays(small_bmnist))
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif damage == "truncated":
        truncate(path)
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="binarized_mnist.npz"):
        load_dataset("binarized_mnist", tmp_path, download=False)


def test_binarized_mnist_amat(tmp_path: Path, small_bmnist: dict[str, int]) -> None:
    arrays = bmnist_arrays(small_bmnist)
    for split, rows in arrays.items():
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", rows)
    s = load_dataset("binarized_mnist", tmp_path, download=False)
    assert_splits(s, "binary", (1, 28, 28), (6, 3, 2))
    assert torch.equal(s.train.reshape(6, 784), torch.from_numpy(arrays["train"]).float())


def test_binarized_mnist_amat_download(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    small_bmnist: dict[str, int],
) -> None:
    server = tmp_path / "server"
    server.mkdir()
    for split, rows in bmnist_arrays(small_bmnist).items():
        write_amat(server / f"binarized_mnist_{split}.amat", rows)
    monkeypatch.setattr(binarized_mnist, "AMAT_URL", server.as_uri() + "/binarized_mnist_{split}.amat")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="binarized_mnist_train.amat not found"):
        load_dataset("binarized_mnist", cache, download=False)
    assert_splits(load_dataset("binarized_mnist", cache), "binary", (1, 28, 28), (6, 3, 2))
    assert (cache / "binarized_mnist_test.amat").is_file()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "line|shape"),
        ("value", "values other than 0 and 1"),
        ("garbage", "line 1"),
        ("rows", "shape"),
    ],
)
def test_binarized_mnist_amat_bad(
    tmp_path: Path,
    small_bmnist: dict[str, int],
    damage: str,
    message: str,
) -> None:
    arrays = bmnist_arrays(small_bmnist)
    for split, rows in arrays.items():
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", rows)
    path = tmp_path / "binarized_mnist_valid.amat"
    if damage == "truncated":
        truncate(path, 0.7)
    elif damage == "value":
        path.write_text(path.read_text().replace("1", "2", 1))
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(2).bytes(4000))
    else:
        write_amat(path, arrays["valid"][:2])
    with pytest.raises(DataError, match=f"binarized_mnist_valid.amat.*({message})"):
        load_dataset("binarized_mnist", tmp_path, download=False)


# ---------------------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.fixture
def small_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (mnist, fashion_mnist):
        monkeypatch.setattr(module, "TRAIN_FILE_ROWS", 8)
        monkeypatch.setattr(module, "TEST_FILE_ROWS", 3)
        monkeypatch.setattr(module, "N_VALID", 2)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())


def idx_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(
    tmp_path: Path,
    small_mnist: None,
    monkeypatch: pytest.MonkeyPatch,
    compress: bool,
) -> None:
    train, test = idx_images(8), idx_images(3, 1)
    suffix = ".gz" if compress else ""
    a = write_idx(tmp_path / "mnist" / f"train-images-idx3-ubyte{suffix}", train, compress=compress)
    b = write_idx(tmp_path / "mnist" / f"t10k-images-idx3-ubyte{suffix}", test, compress=compress)
    if compress:  # .gz files are checked against the published checksums
        monkeypatch.setattr(mnist, "CHECKSUMS", {a.name: sha256_of(a), b.name: sha256_of(b)})
    s = load_dataset("mnist", tmp_path, download=False)
    assert_splits(s, "grayscale", (1, 28, 28), (6, 2, 3))
    assert torch.allclose(s.valid[:, 0] * 255, torch.from_numpy(train[6:]).float())
    assert torch.allclose(s.test[:, 0] * 255, torch.from_numpy(test).float())


def test_mnist_gz_checksum_mismatch(tmp_path: Path, small_mnist: None) -> None:
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", idx_images(8), compress=True)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt"):
        load_dataset("mnist", tmp_path, download=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage_gz", "gzip"),
        ("truncated_gz", "truncated"),
        ("truncated_raw", "truncated"),
        ("garbage_raw", "not an IDX file"),
        ("count", "shape"),
        ("size", "shape"),
        ("dtype", "data type"),
    ],
)
def test_mnist_idx_bad(
    tmp_path: Path,
    small_mnist: None,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
    message: str,
) -> None:
    monkeypatch.setattr(mnist, "CHECKSUMS", {})  # check the parser, not the checksum
    d = tmp_path / "mnist"
    write_idx(d / "t10k-images-idx3-ubyte", idx_images(3), compress=False)
    train = d / ("train-images-idx3-ubyte.gz" if damage.endswith("gz") else "train-images-idx3-ubyte")
    write_idx(train, idx_images(8), compress=damage.endswith("gz"))
    if damage == "garbage_gz":
        train.write_bytes(b"\x1f\x8b" + np.random.default_rng(3).bytes(3000))
    elif damage.startswith("truncated"):
        truncate(train)
    elif damage == "garbage_raw":
        train.write_bytes(np.random.default_rng(3).bytes(3000))
    elif damage == "count":
        write_idx(train, idx_images(7), compress=False)
    elif damage == "size":
        write_idx(train, np.zeros((8, 28, 27), np.uint8), compress=False)
    else:
        raw = bytearray(train.read_bytes())
        raw[2] = 0x0D  # float32
        train.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte.*{message}"):
        load_dataset("mnist", tmp_path, download=False)


def test_mnist_download(tmp_path: Path, small_mnist: None, monkeypatch: pytest.MonkeyPatch) -> None:
    server = tmp_path / "server"
    a = write_idx(server / "train-images-idx3-ubyte.gz", idx_images(8), compress=True)
    b = write_idx(server / "t10k-images-idx3-ubyte.gz", idx_images(3), compress=True)
    monkeypatch.setattr(mnist, "BASE_URLS", (server.as_uri() + "/",))
    monkeypatch.setattr(mnist, "CHECKSUMS", {a.name: sha256_of(a), b.name: "f" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz not found"):
        load_dataset("mnist", cache, download=False)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: checksum mismatch"):
        load_dataset("mnist", cache)
    assert (cache / "mnist" / a.name).is_file()  # the good file is cached ...
    assert not (cache / "mnist" / b.name).exists()  # ... the bad one is not left behind
    assert no_temp_files(cache / "mnist")
    monkeypatch.setattr(mnist, "CHECKSUMS", {a.name: sha256_of(a), b.name: sha256_of(b)})
    assert_splits(load_dataset("mnist", cache), "grayscale", (1, 28, 28), (6, 2, 3))


def test_fashion_mnist_search_order(
    tmp_path: Path,
    small_mnist: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system = tmp_path / "system"
    write_idx(system / "train-images-idx3-ubyte.gz", np.full((8, 28, 28), 255, np.uint8), compress=True)
    write_idx(system / "t10k-images-idx3-ubyte.gz", np.full((3, 28, 28), 255, np.uint8), compress=True)
    write_idx(tmp_path / "data" / "fashion_mnist" / "train-images-idx3-ubyte", idx_images(8), compress=False)
    write_idx(tmp_path / "data" / "fashion_mnist" / "t10k-images-idx3-ubyte", idx_images(3), compress=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (system,))
    s = load_dataset("fashion-mnist", tmp_path / "data", download=False)
    assert_splits(s, "grayscale", (1, 28, 28), (6, 2, 3))
    assert bool((s.train == 1).all())  # the system copy wins
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (tmp_path / "absent",))
    s = load_dataset("fashion_mnist", tmp_path / "data", download=False)
    assert torch.allclose(s.test[:, 0] * 255, torch.from_numpy(idx_images(3)).float())
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz not found.*fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path / "empty", download=False)


def test_fashion_mnist_system_package() -> None:
    if not (FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    s = load_dataset("fashion_mnist", FASHION_SYSTEM_DIR / "no-cache", download=False)
    assert_splits(s, "grayscale", (1, 28, 28), (50_000, 10_000, 10_000))


# ---------------------------------------------------------------------------- Frey Faces


@pytest.fixture
def small_frey(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freyfaces, "NPZ_SHA256", None)
    monkeypatch.setattr(freyfaces, "N_IMAGES", 20)
    monkeypatch.setattr(freyfaces, "N_VALID", 4)
    monkeypatch.setattr(freyfaces, "N_TEST", 3)


def test_freyfaces(tmp_path: Path, small_frey: None) -> None:
    images = np.arange(20 * 28 * 20).reshape(20, 28, 20).astype(np.uint8)
    np.savez(tmp_path / "freyfaces.npz", images=images)
    s = load_dataset("freyfaces", tmp_path, seed=1)
    assert_splits(s, "8bit", (1, 28, 20), (13, 4, 3))
    again = load_dataset("freyfaces", tmp_path, seed=1)
    other = load_dataset("freyfaces", tmp_path, seed=2)
    assert torch.equal(s.train, again.train) and not torch.equal(s.train, other.train)
    together = torch.cat([s.train, s.valid, s.test]).reshape(20, -1)
    assert sorted(together[:, 0].tolist()) == sorted(images.reshape(20, -1)[:, 0].tolist())


def test_freyfaces_problems(tmp_path: Path, small_frey: None) -> None:
    with pytest.raises(DataError, match="freyfaces.npz not found"):
        load_dataset("freyfaces", tmp_path)
    (tmp_path / "freyfaces.pkl").write_bytes(b"not read")
    with pytest.raises(DataError, match="never unpickles"):
        load_dataset("freyfaces", tmp_path)
    path = tmp_path / "freyfaces.npz"
    np.savez(path, images=np.zeros((20, 20, 28), np.uint8))
    with pytest.raises(DataError, match="freyfaces.npz.*expected uint8"):
        load_dataset("freyfaces", tmp_path)
    np.savez(path, images=np.zeros((20, 28, 20), np.float32))
    with pytest.raises(DataError, match="freyfaces.npz.*expected uint8"):
        load_dataset("freyfaces", tmp_path)
    np.savez(path, images=np.zeros((20, 28, 20), np.uint8))
    truncate(path)
    with pytest.raises(DataError, match="freyfaces.npz: truncated"):
        load_dataset("freyfaces", tmp_path)
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="freyfaces.npz"):
        load_dataset("freyfaces", tmp_path)
    np.savez(path, images=np.array([None] * 20, dtype=object))
    with pytest.raises(DataError, match="freyfaces.npz: holds object arrays"):
        load_dataset("freyfaces", tmp_path)


def test_freyfaces_checksum(tmp_path: Path) -> None:
    np.savez(tmp_path / "freyfaces.npz", images=np.zeros((1965, 28, 20), np.uint8))
    with pytest.raises(DataError, match="freyfaces.npz: corrupt"):
        load_dataset("freyfaces", tmp_path)


# ---------------------------------------------------------------------------- digits


def test_digits() -> None:
    s = load_dataset("digits")
    assert_splits(s, "binary", (1, 8, 8), (1297, 250, 250))
    assert torch.equal(s.train, load_dataset("digits", seed=0).train)
    assert not torch.equal(s.train, load_dataset("digits", seed=1).train)


def test_digits_are_sklearns() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from flowvae.data.digits import digit_images

    assert np.array_equal(digit_images(), sklearn_datasets.load_digits().images)


# ---------------------------------------------------------------------------- CIFAR-10


@pytest.fixture
def small_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar10, "TAR_SHA256", None)
    monkeypatch.setattr(cifar10, "ROWS_PER_BATCH", 2)
    monkeypatch.setattr(cifar10, "N_VALID", 3)


def fake_cifar(path: Path, **replace: bytes) -> Path:
    batches = {f"data_batch_{i}": cifar_batch(2, 10 * i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(2, 99)
    batches["batches.meta"] = b"ignored"
    batches.update(replace)
    return cifar_tarball(path, batches)


def test_cifar10(tmp_path: Path, small_cifar: None) -> None:
    fake_cifar(tmp_path / "cifar-10-python.tar.gz")
    s = load_dataset("cifar10", tmp_path, download=False)
    assert_splits(s, "8bit", (3, 32, 32), (7, 3, 2))
    first = ((np.arange(3072) + 10) % 256).astype(np.uint8).reshape(3, 32, 32)
    assert torch.equal(s.train[0], torch.from_numpy(first))  # rows are R, G, B planes


class _Boom:
    def __reduce__(self):  # would run print(...) if unpickled with pickle.load
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"data_batch_3": pickle.dumps({"data": _Boom()})}, "refusing to load global builtins.print"),
        ({"data_batch_2": b"garbage"}, "data_batch_2: not a valid CIFAR batch"),
        ({"test_batch": pickle.dumps({"labels": []})}, "no 'data' array"),
        ({"test_batch": pickle.dumps({"data": np.zeros((2, 3071), np.uint8)})}, "expected uint8"),
        ({"data_batch_1": cifar_batch(3, 0)}, "3 images, expected 2"),
    ],
)
def test_cifar10_bad_batches(
    tmp_path: Path,
    small_cifar: None,
    capsys,
    replace: dict[str, bytes],
    message: str,
) -> None:
    fake_cifar(tmp_path / "cifar-10-python.tar.gz", **replace)
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", tmp_path, download=False)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_cifar10_bad_archive(tmp_path: Path, small_cifar: None, damage: str) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    if damage == "missing":
        batches = {f"data_batch_{i}": cifar_batch(2, 0) for i in range(1, 5)}
        cifar_tarball(path, batches)
        message = "missing cifar-10-batches-py/data_batch_5, cifar-10-batches-py/test_batch"
    else:
        fake_cifar(path)
        if damage == "truncated":
            truncate(path)
        else:
            path.write_bytes(np.random.default_rng(4).bytes(9000))
        message = "cifar-10-python.tar.gz: truncated or not a valid tar.gz"
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar10_download(
    tmp_path: Path,
    small_cifar: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = fake_cifar(tmp_path / "served.tar.gz")
    monkeypatch.setattr(cifar10, "URL", src.as_uri())
    with pytest.raises(DataError, match="cifar-10-python.tar.gz not found"):
        load_dataset("cifar10", tmp_path / "cache", download=False)
    monkeypatch.setattr(cifar10, "TAR_SHA256", "e" * 64)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(cifar10, "TAR_SHA256", sha256_of(src))
    assert_splits(load_dataset("cifar10", tmp_path / "cache"), "8bit", (3, 32, 32), (7, 3, 2))
    assert (tmp_path / "cache" / "cifar-10-python.tar.gz").is_file()


def test_cifar_reader_accepts_numpy_pickles() -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 3, 4):
        batch = pickle.dumps({"data": data, "labels": [1, 2]}, protocol=protocol)
        if protocol == 2:  # Python 3 writes bytes in protocol 2 via _codecs.encode: refused
            with pytest.raises(DataError, match="_codecs"):
                read_cifar_batch(batch, "batch")
        else:
            assert np.array_equal(read_cifar_batch(batch, "batch"), data)


# ---------------------------------------------------------------------------- the real files


def test_real_binarized_mnist() -> None:
    if not (SHARED_DATA / "binarized_mnist.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'binarized_mnist.npz'} is absent")
    s = load_dataset("binarized_mnist", SHARED_DATA, download=False)
    assert_splits(s, "binary", (1, 28, 28), (50_000, 10_000, 10_000))
    assert 0.1 < float(s.train.mean()) < 0.2  # about 13% of MNIST pixels are on


def test_real_freyfaces() -> None:
    if not (SHARED_DATA / "freyfaces.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'freyfaces.npz'} is absent")
    s = load_dataset("freyfaces", SHARED_DATA, download=False)
    assert_splits(s, "8bit", (1, 28, 20), (1565, 200, 200))
    assert int(s.train.max()) > 200
