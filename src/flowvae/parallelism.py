"""How flowvae sets up torch's CPU threads so that a busy machine does not stall them.

torch's CPU kernels run in OpenMP (GNU libgomp) parallel regions.  A thread that finishes its
share spins, by default for 300,000 iterations, before it sleeps.  On a quiet machine that is what
makes 2 threads fast; beside another busy process it is a collapse: the OS deschedules one of
torch's threads and the other spins away its time slice at every region.  Measured on 2 cores with
``benchmarks/threads.py`` (README's MNIST model, steps/s; docs/benchmarks.md, "A busy machine"):

    =====================  =======  ==============================
    wait policy            quiet    beside one busy process
    =====================  =======  ==============================
    spin (libgomp default) 87-92    2-27
    spin 10k-100k          86-93    10-19
    passive (sleep)        43-44    53
    =====================  =======  ==============================

No single policy is good in both columns, and the policy is read once, when torch is loaded.  So
``import flowvae`` (the ``flowvae`` command always) looks at the machine before torch is loaded:
when other processes keep runnable more threads than the CPUs that torch's threads leave free, it
sets ``OMP_WAIT_POLICY=PASSIVE``; otherwise it leaves libgomp's spinning.  Both give the same
numbers, bit for bit (only the thread count would change them).  A user's own ``OMP_WAIT_POLICY``
or ``GOMP_SPINCOUNT`` is left alone.  Under a cgroup CPU quota below the visible CPUs it also sets
``OMP_NUM_THREADS`` to the quota (torch would otherwise start one thread per visible CPU).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROBES, PROBE_INTERVAL_S = 5, 0.01  # /proc/loadavg read 5 times over 40 ms: the median runnable count


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 ``cpu.max``
    or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) where one is set."""
    quota = _cgroup_quota(cgroup_root)
    return min(_affinity(), quota) if quota else float(_affinity())


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cgroup_quota(root: Path) -> float | None:
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def other_runnable() -> float:
    """Threads of other processes that are running or ready to run now (Linux's /proc/loadavg,
    the median of a few reads; 0 where it cannot be read)."""
    counts = []
    for i in range(PROBES):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # less this process
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < PROBES:
            time.sleep(PROBE_INTERVAL_S)
    return float(statistics.median(counts))


def apply_thread_defaults(
    environ: MutableMapping[str, str] = os.environ,
    cgroup_root: Path = CGROUP_ROOT,
    runnable: Callable[[], float] = other_runnable,
) -> dict[str, str]:
    """Before torch is loaded: ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy (``runnable``
    other threads plus torch's threads exceed the CPUs), unless the user chose a wait policy;
    ``OMP_NUM_THREADS`` from a cgroup CPU quota below the visible CPUs, unless the user set it.

    Returns what was set (nothing once torch is imported, when libgomp has read its environment).
    """
    if "torch" in sys.modules:
        return {}
    applied = {}
    quota, affinity = _cgroup_quota(cgroup_root), _affinity()
    cpus = min(affinity, quota) if quota else affinity
    if "OMP_NUM_THREADS" not in environ and cpus < affinity:
        applied["OMP_NUM_THREADS"] = str(max(1, math.floor(cpus)))
    threads = _int(environ.get("OMP_NUM_THREADS", applied.get("OMP_NUM_THREADS"))) or affinity
    if not any(name in environ for name in POLICY_VARIABLES) and threads > 1:
        if oversubscribed(runnable(), threads, cpus):
            applied["OMP_WAIT_POLICY"] = "PASSIVE"
    environ.update(applied)
    return applied


def oversubscribed(others: float, threads: int, cpus: float) -> bool:
    """Whether ``others`` runnable threads of other processes and torch's ``threads`` need more than
    the ``cpus`` (with half a CPU of slack for a reading between two integers)."""
    return others + threads > cpus + 0.5


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def spins_long() -> bool:
    """Whether torch's OpenMP threads spin-wait (libgomp's default, or the user's choice)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").upper()
    spin = os.environ.get("GOMP_SPINCOUNT", "").strip()
    return policy == "ACTIVE" or (policy != "PASSIVE" and spin not in ("0",))


def warn_if_oversubscribed(threads: int, runnable: Callable[[], float] = other_runnable) -> bool:
    """Warn when torch's threads spin-wait on a machine whose other processes already keep the CPUs
    busy: the collapse above (the machine became busy after flowvae was imported, or torch was
    imported first).  Returns whether it warned."""
    if threads <= 1 or not spins_long():
        return False
    others, cpus = runnable(), available_cpus()
    if not oversubscribed(others, threads, cpus):
        return False
    logger.warning(
        "warning: the machine is busy (%g other runnable threads on %g CPUs) and torch's %d threads "
        "spin-wait for each other: training can run many times slower; set OMP_WAIT_POLICY=PASSIVE "
        "(import flowvae before torch does it) or --threads 1",
        others,
        cpus,
        threads,
    )
    return True
