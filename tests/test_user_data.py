"""A user's own data: ``--dataset PATH`` (folder, .npy, .npz), kinds, splits, and the bad input.

The bad-input cases run ``flowvae.cli.main`` in this process (an uncaught exception would fail the
test with its traceback) and check: exit status 2, one line on stderr naming the problem, nothing
on stdout, and no file written or changed in the case's directory.  One case runs the real command
in its own process, as a user would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
import torch
from PIL import Image

from flowvae.cli import main
from flowvae.data import DataError, DatasetSplits
from flowvae.data.files import detect_kind, load_images_for, load_path, splits_from_arrays

SRC = Path(__file__).resolve().parents[1] / "src"
QUICK = tiny_runs.flags(tiny_runs.SMALLEST | dict(eval_batch_size=50, batch_size=50))


def binary_images(n: int = 60, side: int = 8, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, side, side)) > 0.5).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray, mode: str = "L") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x, mode=None).convert(mode).save(folder / f"{i:03d}.png")
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------------ reading data


def test_registered_names_win_over_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowvae.data.files import is_data_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    (tmp_path / "mine").mkdir()
    assert not is_data_path("digits") and is_data_path("./digits") and is_data_path("mine")
    assert is_data_path("x.npy") and is_data_path("X.NPZ") and not is_data_path("binarized_mnist")


def test_npy_binary_detected_and_split_reproducibly(tmp_path: Path) -> None:
    x = binary_images(100)
    np.save(tmp_path / "x.npy", x)
    a = load_path(tmp_path / "x.npy", seed=3)
    b = load_path(tmp_path / "x.npy", seed=3)
    c = load_path(tmp_path / "x.npy", seed=4)
    assert a.kind == "binary" and a.image_shape == (1, 8, 8)
    assert (len(a.train), len(a.valid), len(a.test)) == (80, 10, 10)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)
    together = torch.cat([a.train, a.valid, a.test]).reshape(100, -1)
    assert sorted(map(tuple, together.int().tolist())) == sorted(map(tuple, x.reshape(100, -1).tolist()))
    d = load_path(tmp_path / "x.npy", valid_fraction=0.2, test_fraction=0.3)
    assert (len(d.train), len(d.valid), len(d.test)) == (50, 20, 30)


def test_npz_with_splits_and_single_array(tmp_path: Path) -> None:
    x = binary_images(50)
    np.savez(tmp_path / "s.npz", train=x[:30], valid=x[30:40], test=x[40:])
    s = load_path(tmp_path / "s.npz")
    assert (len(s.train), len(s.valid), len(s.test)) == (30, 10, 10)
    assert torch.equal(s.valid[:, 0], torch.from_numpy(x[30:40]).float())
    np.savez(tmp_path / "one.npz", images=x)
    assert len(load_path(tmp_path / "one.npz").train) == 40
    np.savez(tmp_path / "train_only.npz", train=x)  # valid and test cut from train
    assert (len(load_path(tmp_path / "train_only.npz").test)) == 5


def test_layouts_channels_last_and_flat_square(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    s = load_path(tmp_path / "rgb.npy")
    assert s.kind == "8bit" and s.image_shape == (3, 6, 6) and s.train.dtype == torch.uint8
    np.save(tmp_path / "flat.npy", binary_images(20).reshape(20, 64))
    assert load_path(tmp_path / "flat.npy").image_shape == (1, 8, 8)


def test_kinds_detected_from_values() -> None:
    assert detect_kind(np.array([0.0, 1.0])) == "binary"
    assert detect_kind(np.array([0, 1], dtype=np.int64)) == "binary"
    assert detect_kind(np.array([True, False])) == "binary"
    assert detect_kind(np.array([0.0, 0.25, 1.0], dtype=np.float32)) == "grayscale"
    assert detect_kind(np.array([0, 17, 255], dtype=np.uint8)) == "8bit"
    assert detect_kind(np.array([0, 255], dtype=np.uint8)) == "8bit"
    assert detect_kind(np.array([0, 255], dtype=np.uint8), from_images=True) == "binary"
    with pytest.raises(DataError, match="fit no data kind"):
        detect_kind(np.array([0.0, 3.5]))


def test_grayscale_floats_are_not_divided_again() -> None:
    x = np.full((10, 1, 4, 4), 0.5, dtype=np.float32)
    s = splits_from_arrays(x, x[:2], x[:2], kind="grayscale")
    assert torch.allclose(s.train, torch.full_like(s.train, 0.5))
    s = DatasetSplits.from_numpy("g", "grayscale", x, x, x, (1, 4, 4))
    assert torch.allclose(s.train, torch.full_like(s.train, 0.5))
    s = DatasetSplits.from_numpy("g", "grayscale", (x * 255).astype(np.uint8), x, x, (1, 4, 4))
    assert abs(s.train.max().item() - 127 / 255) < 1e-6


def test_from_numpy_checks_values() -> None:
    x = np.full((4, 1, 2, 2), 255, dtype=np.uint8)
    with pytest.raises(DataError, match=r"b \[train\].*binary needs values 0 and 1"):
        DatasetSplits.from_numpy("b", "binary", x, x, x, (1, 2, 2))
    with pytest.raises(DataError, match="NaN"):
        DatasetSplits.from_numpy("b", "grayscale", np.full((2, 4), np.nan), x, x, (1, 2, 2))


def test_folder_of_pngs_gray_rgb_and_subfolders(tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (30, 5, 7), dtype=np.uint8)
    write_pngs(tmp_path / "gray", gray)
    s = load_path(tmp_path / "gray")
    assert s.kind == "8bit" and s.image_shape == (1, 5, 7) and len(s.train) + len(s.valid) + len(s.test) == 30
    g = load_path(tmp_path / "gray", kind="grayscale")
    assert g.train.dtype == torch.float32 and 0 <= g.train.min() and g.train.max() <= 1
    bw = (binary_images(20) * 255).astype(np.uint8)
    write_pngs(tmp_path / "bw", bw)
    b = load_path(tmp_path / "bw")
    assert b.kind == "binary" and set(torch.cat([b.train, b.valid, b.test]).unique().tolist()) <= {0.0, 1.0}
    rgb = np.random.default_rng(1).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    for split, part in (("train", rgb[:8]), ("valid", rgb[8:10]), ("test", rgb[10:])):
        write_pngs(tmp_path / "split" / split, part, mode="RGB")
    r = load_path(tmp_path / "split")
    assert r.image_shape == (3, 4, 4) and (len(r.train), len(r.valid), len(r.test)) == (8, 2, 2)
    assert torch.equal(r.train[0], torch.from_numpy(rgb[0].transpose(2, 0, 1).copy()))


def test_images_for_a_trained_run(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", binary_images(10))
    assert load_images_for(tmp_path / "x.npy", "binary", (1, 8, 8)).shape == (10, 1, 8, 8)
    with pytest.raises(DataError, match=r"shape \(1, 8, 8\).*trained on \(1, 4, 4\)"):
        load_images_for(tmp_path / "x.npy", "binary", (1, 4, 4))
    np.save(tmp_path / "y.npy", np.full((3, 8, 8), 7, dtype=np.uint8))
    with pytest.raises(DataError, match="binary needs values 0 and 1.*trained on binary data"):
        load_images_for(tmp_path / "y.npy", "binary", (1, 8, 8))


# -------------------------------------------------------------------------- the command line trains


def test_train_on_npy_and_png_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", binary_images(100))
    write_pngs(tmp_path / "pngs", (binary_images(60, side=6) * 255).astype(np.uint8))
    assert main(["train", "--dataset", "x.npy", *QUICK, "--out", "runs/npy"]) == 0
    assert main(["train", "--dataset", "pngs", *QUICK, "--out", "runs/png"]) == 0
    capsys.readouterr()
    import yaml

    config = yaml.safe_load((tmp_path / "runs/npy/config.yaml").read_text())
    assert config["dataset"] == str(tmp_path / "x.npy")
    assert (tmp_path / "runs/png/results.json").is_file()


# ----------------------------------------------------------------------------------- the bad input


def _npy(name: str, x: np.ndarray):
    return lambda root: np.save(root / name, x)


def _pngs(sizes: list[tuple[int, int]], modes: list[str] | None = None, name: str = "imgs"):
    def make(root: Path) -> None:
        (root / name).mkdir()
        for i, (h, w) in enumerate(sizes):
            mode = (modes or ["L"] * len(sizes))[i]
            Image.fromarray(np.zeros((h, w), dtype=np.uint8)).convert(mode).save(root / name / f"{i:02d}.png")

    return make


def _corrupt_png(root: Path) -> None:
    _pngs([(8, 8), (8, 8)])(root)
    (root / "imgs" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _sixteen_bit(root: Path) -> None:
    (root / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(root / "imgs" / "a.png")


def _truncated_npy(root: Path) -> None:
    np.save(root / "t.npy", binary_images(50))
    data = (root / "t.npy").read_bytes()
    (root / "t.npy").write_bytes(data[: len(data) // 2])


def _npz(name: str, **arrays: np.ndarray):
    return lambda root: np.savez(root / name, **arrays)


BIN = binary_images(40)
NAN = BIN.astype(np.float32)
NAN[3, 2, 2] = np.nan
INF = BIN.astype(np.float64)
INF[5, 0, 0] = np.inf

BAD = [  # (id, setup, dataset, extra flags, expected in the message)
    ("binary-0-255", _npy("x.npy", BIN * 255), "x.npy", ["--data-kind", "binary"], "binary needs values 0 and 1"),
    ("8bit-above-255", _npy("x.npy", np.full((20, 8, 8), 300, np.int16)), "x.npy", [], "fit no data kind"),
    (
        "8bit-above-255-forced",
        _npy("x.npy", np.full((20, 8, 8), 300, np.int16)),
        "x.npy",
        ["--data-kind", "8bit"],
        "8bit needs integers 0..255",
    ),
    (
        "8bit-non-integer",
        _npy("x.npy", np.full((20, 8, 8), 0.5, np.float32)),
        "x.npy",
        ["--data-kind", "8bit"],
        "non-integer 0.5",
    ),
    ("float-above-one", _npy("x.npy", np.full((20, 8, 8), 3.5)), "x.npy", [], "fit no data kind"),
    (
        "grayscale-above-one",
        _npy("x.npy", np.full((20, 8, 8), 3.5)),
        "x.npy",
        ["--data-kind", "grayscale"],
        "grayscale needs floats in [0, 1]",
    ),
    ("negative", _npy("x.npy", -np.ones((20, 8, 8), np.int8)), "x.npy", [], "fit no data kind"),
    ("nan", _npy("x.npy", NAN), "x.npy", [], "NaN"),
    ("inf-npz", _npz("x.npz", train=INF), "x.npz", [], "infinite"),
    ("odd-image-size", _pngs([(8, 8), (8, 8), (9, 8)]), "imgs", [], "02.png is 8x9 grayscale while"),
    ("gray-and-rgb", _pngs([(8, 8), (8, 8)], ["L", "RGB"]), "imgs", [], "01.png is 8x8 RGB while"),
    ("corrupt-png", _corrupt_png, "imgs", [], "01.png is not a readable image"),
    ("16-bit-png", _sixteen_bit, "imgs", [], "not supported"),
    ("empty-folder", lambda root: (root / "imgs").mkdir(), "imgs", [], "holds no PNG or JPEG images"),
    (
        "folder-without-images",
        lambda root: ((root / "imgs").mkdir(), (root / "imgs" / "a.txt").write_text("x")),
        "imgs",
        [],
        "holds no PNG or JPEG images",
    ),
    ("npz-without-keys", _npz("x.npz", a=BIN, b=BIN), "x.npz", [], "holds a, b; expected arrays train"),
    ("npz-empty", lambda root: np.savez(root / "x.npz"), "x.npz", [], "holds no arrays"),
    (
        "npz-mixed-shapes",
        _npz("x.npz", train=BIN, valid=binary_images(5, side=6)),
        "x.npz",
        [],
        "different image shapes",
    ),
    ("npz-mixed-dtypes", _npz("x.npz", train=BIN, valid=BIN.astype(np.float32)), "x.npz", [], "different dtypes"),
    ("truncated-npy", _truncated_npy, "t.npy", [], "not a readable .npy"),
    (
        "pickled-npy",
        lambda root: np.save(root / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "x.npy",
        [],
        "not a readable .npy",
    ),
    ("text-as-npy", lambda root: (root / "x.npy").write_text("hello"), "x.npy", [], "not a readable .npy"),
    ("one-dimensional", _npy("x.npy", np.zeros(10)), "x.npy", [], "got shape (10,)"),
    ("five-channels", _npy("x.npy", np.zeros((4, 5, 6, 7))), "x.npy", [], "got shape (4, 5, 6, 7)"),
    ("flat-not-square", _npy("x.npy", np.zeros((4, 10))), "x.npy", [], "are not square images"),
    ("empty-array", _npy("x.npy", np.zeros((0, 8, 8))), "x.npy", [], "holds no images"),
    ("complex", _npy("x.npy", np.zeros((4, 8, 8), np.complex64)), "x.npy", [], "real numbers"),
    ("too-few-to-split", _npy("x.npy", BIN[:3]), "x.npy", [], "too few to split off"),
    ("missing-path", lambda root: None, "nothing.npy", [], "nothing.npy does not exist"),
    ("not-a-data-file", lambda root: (root / "x.csv").write_text("1,2"), "./x.csv", [], "give a folder"),
    ("bad-kind", _npy("x.npy", BIN), "x.npy", ["--data-kind", "color"], "data_kind must be binary"),
    ("valid-fraction-zero", _npy("x.npy", BIN), "x.npy", ["--valid-fraction", "0"], "valid_fraction must be in (0, 1)"),
    ("fractions-sum", _npy("x.npy", BIN), "x.npy", ["--valid-fraction", "0.5", "--test-fraction", "0.5"], "below 1"),
    ("fraction-not-number", _npy("x.npy", BIN), "x.npy", ["--test-fraction", "a lot"], "test_fraction must be float"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_data_is_one_line_and_writes_nothing(
    case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, setup, dataset, extra, expected = case
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    before = snapshot(tmp_path)
    code = main(["train", "--dataset", dataset, *extra, *QUICK, "--out", "runs/bad"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("flowvae train: error: "), err
    assert expected in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_bad_data_through_the_real_command(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", BIN * 255)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowvae",
            "train",
            "--dataset",
            "x.npy",
            "--data-kind",
            "binary",
            *QUICK,
            "--out",
            "runs/bad",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "binary needs values 0 and 1 only, found 255" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


# ------------------------------------------------------------------- evaluate --data against a run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    np.save(root / "x.npy", binary_images(100))
    assert main(["train", "--dataset", str(root / "x.npy"), *QUICK, "--out", str(root / "run")]) == 0
    return root / "run"


EVALUATE_BAD = [  # (id, setup, --data, expected)
    ("other-shape", _npy("y.npy", binary_images(10, side=6)), "y.npy", "shape (1, 6, 6) (C, H, W) but the run was"),
    ("rgb-for-gray", _npy("y.npy", np.zeros((4, 8, 8, 3), np.uint8)), "y.npy", "shape (3, 8, 8)"),
    ("wrong-kind", _npy("y.npy", np.full((4, 8, 8), 0.5)), "y.npy", "binary needs values 0 and 1"),
    ("nan", _npy("y.npy", NAN), "y.npy", "NaN"),
    ("no-such-split", _npz("y.npz", train=BIN, valid=BIN), "y.npz", "has no test split"),
    ("missing", lambda root: None, "nothing.npy", "nothing.npy does not exist"),
    ("empty-folder", lambda root: (root / "imgs").mkdir(), "imgs", "holds no PNG or JPEG images"),
]


@pytest.mark.parametrize("case", EVALUATE_BAD, ids=[c[0] for c in EVALUATE_BAD])
def test_evaluate_bad_data_is_one_line_and_writes_nothing(
    case, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, setup, data, expected = case
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    before, run_before = snapshot(tmp_path), snapshot(trained_run)
    code = main(["evaluate", "--run", str(trained_run), "--data", data, "--samples", "2", "--output", "e.json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, err
    assert err.startswith("flowvae evaluate: error: ") and "Traceback" not in err
    assert snapshot(tmp_path) == before and snapshot(trained_run) == run_before
