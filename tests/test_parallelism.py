"""flowvae's CPU thread defaults: chosen from the machine when the user has set nothing, left alone otherwise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowvae import parallelism

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = (
    "import json, os, sys; {first}; import torch; "
    "print(json.dumps({{'policy': os.environ.get('OMP_WAIT_POLICY'), 'spin': os.environ.get('GOMP_SPINCOUNT'),"
    " 'threads': torch.get_num_threads()}}))"
)
HOG = "while True: pass"


def probe(first: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        env=clean | env | {"PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout)


@pytest.fixture
def busy_machine():
    """As many busy processes as this process may use CPUs: any thread of torch's would wait for a core."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(int(parallelism.available_cpus()))]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def test_import_flowvae_on_a_busy_machine_makes_the_threads_sleep_instead_of_spin(busy_machine):
    # With one CPU allowed (e.g. under taskset), torch runs one thread, which waits for no other.
    assert probe("import flowvae")["policy"] == ("PASSIVE" if parallelism.available_cpus() >= 2 else None)


@pytest.mark.parametrize("variable, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "12345")])
def test_a_policy_the_user_chose_is_left_alone(busy_machine, variable, value):
    seen = probe("import flowvae", **{variable: value})
    assert seen["policy"] == (value if variable == "OMP_WAIT_POLICY" else None)
    assert seen["spin"] == (value if variable == "GOMP_SPINCOUNT" else None)


def test_nothing_is_set_once_torch_is_loaded(busy_machine):
    """libgomp has read its environment by then: setting it would only mislead."""
    assert probe("import torch; import flowvae")["policy"] is None


def test_the_thread_count_is_left_to_torch_or_the_user():
    assert probe("import flowvae", OMP_NUM_THREADS="1")["threads"] == 1


@pytest.mark.parametrize("others, expected", [(0.0, {}), (1.0, {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_the_policy_follows_the_other_runnable_threads(monkeypatch, tmp_path, others, expected):
    """On 2 CPUs with 2 torch threads: libgomp's spinning on a quiet machine, sleeping beside a busy process."""
    monkeypatch.delitem(sys.modules, "torch")  # as if torch were not loaded yet
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    environ: dict[str, str] = {}
    assert parallelism.apply_thread_defaults(environ, tmp_path, runnable=lambda: others) == expected
    assert environ == expected


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert parallelism._cgroup_quota(tmp_path) == expected


def test_a_cgroup_quota_below_the_visible_cpus_sets_the_thread_count(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    environ: dict[str, str] = {}
    assert parallelism.apply_thread_defaults(environ, tmp_path, runnable=lambda: 5.0) == {"OMP_NUM_THREADS": "1"}
    environ = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert parallelism.apply_thread_defaults(environ, tmp_path, runnable=lambda: 5.0) == {}
    assert environ == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}


def test_spinning_threads_on_a_busy_machine_are_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(parallelism, "available_cpus", lambda: 2.0)
    caplog.set_level(logging.WARNING, logger="flowvae.parallelism")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert parallelism.warn_if_oversubscribed(2, runnable=lambda: 1.0)
    assert "busy" in caplog.text and "OMP_WAIT_POLICY=PASSIVE" in caplog.text
    assert not parallelism.warn_if_oversubscribed(2, runnable=lambda: 0.0), "a quiet machine"
    assert not parallelism.warn_if_oversubscribed(1, runnable=lambda: 1.0), "one thread waits for nobody"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert not parallelism.warn_if_oversubscribed(2, runnable=lambda: 1.0), "sleeping threads do not stall"


def test_other_runnable_counts_a_busy_process(busy_machine):
    assert parallelism.other_runnable() >= 1
