"""``flowvae train --help`` explains every option; ``-v`` works after the subcommand; the progress
shown while training is a windowed images/s, and a log that is not a terminal gets plain lines."""

from __future__ import annotations

import argparse
import logging

import pytest
import tiny_runs

from flowvae.cli import build_parser, main
from flowvae.cli.option_help import HELP, choices
from flowvae.config import config_fields
from flowvae.progress import Throughput

# The progress bar left at its default (on): the tests below read it.
QUICK = tiny_runs.flags(
    {k: v for k, v in tiny_runs.SMALLEST.items() if k != "progress"} | dict(dataset="digits", epochs=2)
)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_train_option_has_a_description_and_its_choices() -> None:
    assert set(HELP) <= {f.name for f in config_fields()}, "cli.option_help.HELP names fields that do not exist"
    actions = {a.dest: a for a in _subparser("train")._actions}
    for f in config_fields():
        text, described = actions[f.name].help, HELP.get(f.name) or f.metadata.get("help", "")
        assert len(described) > 10, f"--{f.name.replace('_', '-')} has no description (cli.option_help.HELP)"
        assert text.startswith(described) and "(default: " in text
        if choices(f.name):
            assert "one of " + ", ".join(choices(f.name)) in text
    assert "iaf" in actions["flow"].help and "vamp" in actions["prior"].help and "8bit" in actions["data_kind"].help
    assert "K=5000" in actions["eval_samples"].help
    assert "K = 5000" in _subparser("train").description


def test_help_text_lists_the_flow_names(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "sylvester-householder" in out and "default: digits" in out and "a .npy or a .npz" in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_subcommand(where: str, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    flag = ["-v"]
    argv = flag + ["train", *QUICK, "--out", "run"] if where == "before" else ["train", "-v", *QUICK, "--out", "run"]
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # basicConfig configures afresh in each case
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        assert main(argv) == 0
    finally:
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "epoch 2/2  train loss" in err and " s  " in err and "images/s" in err


def test_plain_lines_when_not_a_terminal(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    library = logging.getLogger("flowvae")
    level = library.level
    library.setLevel(logging.WARNING)  # as without -v (setLevel also clears the loggers' caches)
    try:
        assert main(["train", *QUICK, "--out", "run"]) == 0  # progress on (the default); stderr is captured
    finally:
        library.setLevel(level)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch")]  # (a warning may come first)
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "\r" not in err and "\x1b" not in err and all(line.endswith("images/s") for line in lines)


def test_throughput_is_windowed_not_since_the_epoch_began() -> None:
    times = iter([0.0, 30.0, 31.0, 32.0, 33.0, 34.0])  # a 30 s first step (compilation), then 1 s steps
    t = Throughput(window=2.0, clock=times.__next__)
    t.add(100)
    assert t.images_per_second() == pytest.approx(100 / 30)
    for _ in range(4):
        t.add(100)
    assert t.images_per_second() == pytest.approx(100.0)  # the first step has left the window
    assert t.seconds() == 34.0


def test_throughput_refreshes_once_a_second() -> None:
    times = iter([0.0, 0.2, 0.4, 1.3, 1.5, 2.4])
    t = Throughput(clock=times.__next__)
    shown = []
    for _ in range(5):
        t.add(10)
        shown.append(t.due())
    assert shown == [True, False, True, False, True]  # at 0.2, 1.3 and 2.4: at least 1 s apart
