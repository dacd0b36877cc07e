"""The documentation site: ``mkdocs build --strict`` succeeds, the navigation names existing pages,
``docs/cli.md`` matches the parser, and every ``>>>`` example in the package's docstrings runs."""

from __future__ import annotations

import argparse
import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flowvae
from flowvae.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _nav_files(nav: list) -> set[str]:
    files: set[str] = set()
    for item in nav:
        for value in item.values():
            files |= _nav_files(value) if isinstance(value, list) else {value}
    return files


def test_the_navigation_names_existing_pages() -> None:
    """Every navigation entry is a page, and the site's own pages are in it.  (A page left out of the
    navigation is still built and linked pages reach it; add new pages to mkdocs.yml's nav.)"""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert nav <= pages, f"in the navigation but not in docs/: {nav - pages}"
    assert {"index.md", "getting-started.md", "your-data.md", "your-model.md", "cli.md"} <= nav
    assert {p for p in pages if p.startswith("api/")} <= nav
    assert config["strict"] is True


def test_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "runs" / "index.html").read_text()
    assert "load_run" in api and "TrainedRun" in api  # the API reference is rendered from the docstrings
    assert "build_flow" in (tmp_path / "site" / "api" / "flows" / "index.html").read_text()


def test_cli_reference_is_current() -> None:
    """Every option of every subcommand is in docs/cli.md with its help text (regenerate with
    ``python -m flowvae.cli.docs > docs/cli.md``)."""
    page = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        assert f"## flowvae {name}" in page
        for action in subparser._actions:
            for flag in action.option_strings:
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", page), f"flowvae {name} {flag}"
            if action.help and action.help is not argparse.SUPPRESS:
                words = " ".join(action.help.split()[:6])
                assert words in page, f"flowvae {name}: help {words!r} is not in docs/cli.md"


MODULES = sorted(m.name for m in pkgutil.walk_packages(flowvae.__path__, "flowvae.") if m.name != "flowvae.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output)"
