"""Every code block of README.md and docs/*.md runs, or is listed here with the reason it is not.

The Python blocks of each file run in order as one script (later blocks use earlier ones' names,
as a reader would), in a fresh process and an empty directory.  Shell blocks are commands whose
cost or needs (data sets, GPUs, hours of training, a virtual environment) do not fit a unit test;
each is listed in ``NOT_RUN`` with why and, where there is one, the test that runs the same
command on tiny data.  A new block that is neither Python nor listed fails
``test_every_block_is_run_or_listed``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

TINY_CLI = "the same command on tiny data runs in tests/test_bad_input.py and tests/test_training.py"
NOT_RUN: dict[tuple[str, str], str] = {  # (file, the block's first line, up to 40 characters) -> why
    ("README.md", "pip install torch==2.13.0 && pip install"): "installs the package; .ci/run does exactly this",
    ("README.md", "flowvae train --dataset binarized_mnist "): "binarized MNIST for 100 epochs; " + TINY_CLI,
    ("README.md", "flowvae train --config configs/mnist_lad"): "presets that train for an hour or need GPUs; "
    "tests/test_hierarchical.py trains tiny ladders",
    ("README.md", "flowvae train --dataset my_pngs/ --epoch"): "needs your images; tests/test_runs.py runs these "
    "commands on a PNG folder and a .npy",
    ("README.md", "flowvae train --device cuda --precision "): "needs GPUs and torchrun; tests/test_distributed.py "
    "runs 2 gloo workers",
    ("README.md", "src/flowvae/"): "a directory listing, not code",
    ("docs/benchmarks.md", "pip install torch==2.13.0 && pip install"): "installs the benchmarks' peer libraries",
    (
        "docs/benchmarks.md",
        "benchmarks/.venv-peers/bin/python benchm",
    ): "timing benchmarks (minutes, a quiet machine); tests/test_benchmarks.py smokes them",
    ("docs/benchmarks.md", "python benchmarks/mnist_table.py --budge"): "timing benchmarks; tests/test_benchmarks.py",
    ("docs/results.md", "flowvae train --dataset binarized_mnist "): "MNIST runs of 15 to 60 minutes; " + TINY_CLI,
    ("docs/results.md", 'common="--dataset binarized_mnist --data'): "MNIST runs of 15 minutes each; " + TINY_CLI,
    ("docs/results.md", "# ROW's flags from the table; N = 0 or 1"): "the ablation: 15 or 45 minutes of MNIST "
    "training per row; tests/test_objectives_regularisation.py runs every option on tiny data",
    ("docs/results.md", "# N = 0 or 1, one row per core; the seco"): "the ablation's 60-minute MNIST rows; "
    "tests/test_objectives_regularisation.py runs every option on tiny data",
    ("docs/results.md", "# N = 0 or 1, one row per core; ROW's fl"): "the ablation's stage 4: 60 minutes of MNIST "
    "training per row; tests/test_objectives_regularisation.py runs every option on tiny data",
    ("docs/results.md", "# stage 5: N = 0 or 1, one row per core;"): "the ablation's stage 5: 60 minutes of MNIST "
    "training per row; tests/test_objectives_regularisation.py runs every option on tiny data",
    ("docs/results.md", "# stage 6: N = 0 or 1, one row per core;"): "the ablation's stage 6: 60 minutes of MNIST "
    "training per row and a 56-minute evaluation; tests/test_objectives_regularisation.py runs every option",
    ("docs/results.md", "# stage 7, alone on the machine: the pre"): "the ablation's stage 7: the best preset, "
    "60 minutes of MNIST training and a 37-minute evaluation; tests/test_hierarchical.py checks the preset",
    ("docs/results.md", 'single="flowvae train --dataset binarize'): "MNIST runs of 15 minutes; "
    "tests/test_objectives_regularisation.py",
    ("docs/results.md", "flowvae train --config configs/mnist_lad"): "a 49-minute MNIST run; "
    "tests/test_hierarchical.py trains tiny ladders",
    ("docs/index.md", 'pip install -e ".[docs]" && mkdocs build'): "builds this site; .ci/run does it (and "
    "tests/test_site.py checks its sources)",
    ("docs/getting-started.md", "pip install torch==2.13.0 && pip install"): "installs the package; .ci/run does it",
    ("docs/getting-started.md", "flowvae train --dataset digits --flow ia"): "a 100-epoch run (minutes); the "
    "Python block below trains the same",
    ("docs/your-data.md", "flowvae train --dataset my_pngs/ --epoch"): "needs your images; tests/test_runs.py and "
    "tests/test_user_data.py train on PNG folders, "
    ".npy and .npz files",
    ("docs/your-data.md", "flowvae sample --run runs/mine --n 64 --"): "needs the run above; tests/test_runs.py runs "
    "these commands after deleting the data",
    ("docs/toy.md", "flowvae toy --target u1 --flow planar --"): "the grid takes 15 minutes; tests/test_toy.py runs "
    "the command with few iterations",
    ("docs/visualize.md", "flowvae train --dataset digits --latent-"): "two 200-epoch runs (minutes); "
    "tests/test_report.py draws tiny runs",
    ("docs/visualize.md", "flowvae curves runs/digits-2d-planar8   "): "needs the runs above; tests/test_report.py",
    ("docs/visualize.md", "flowvae compare runs/digits-2d-diag runs"): "needs the runs above; tests/test_report.py",
    ("docs/visualize.md", "flowvae posterior --run runs/digits-2d-p"): "needs the runs above; tests/test_report.py",
    ("docs/visualize.md", "flowvae manifold --run runs/digits-2d-pl"): "needs the runs above; tests/test_report.py",
    ("docs/visualize.md", 'common="--dataset binarized_mnist --data'): "MNIST runs of 15 minutes each; "
    "tests/test_report.py",
}


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, code) of each fenced block."""
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_block_is_run_or_listed() -> None:
    listed = set()
    for path in FILES:
        for line, language, code in blocks(path):
            if language in ("python", "text"):  # text: a program's output (docs/cli.md), not code
                continue
            key = (_name(path), code.splitlines()[0][:40])
            assert key in NOT_RUN, (
                f"{_name(path)}:{line}: a {language or 'plain'} block that is neither run nor "
                f"listed in NOT_RUN: {key[1]!r}"
            )
            listed.add(key)
    assert listed == set(NOT_RUN), f"NOT_RUN lists blocks that are gone: {set(NOT_RUN) - listed}"


PYTHON_FILES = [p for p in FILES if any(language == "python" for _, language, _ in blocks(p))]


@pytest.mark.parametrize("path", PYTHON_FILES, ids=_name)
def test_python_blocks_run(path: Path, tmp_path: Path) -> None:
    script = "\n".join(
        f"# --- {_name(path)}, line {line}\n{code}" for line, language, code in blocks(path) if language == "python"
    )
    (tmp_path / "blocks.py").write_text(script)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "blocks.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{_name(path)}'s Python blocks failed:\n{done.stderr[-3000:]}"
