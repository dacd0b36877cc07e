"""How flowvae sets up torch's CPU threads so that a busy machine does not stall them.

torch's CPU kernels run in OpenMP (GNU libgomp) parallel regions.  A thread that finishes its
share spins, by default for 300,000 iterations (milliseconds), before it sleeps.  When another
process keeps a core busy, the OS deschedules one of torch's threads and the other spins away its
time slice at every region: on 2 cores, 2-thread training ran 15-20× slower beside one busy
process (``benchmarks/threads.py``).  ``import flowvae`` therefore lowers the spin count before
torch is first imported, unless the user chose a policy, and keeps the thread count within the
CPUs that the process may actually use (its affinity mask and its cgroup's CPU quota).

Both are read by libgomp once, when torch is loaded: ``import flowvae`` before ``import torch``
(the ``flowvae`` command always does).  Set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` to choose the
policy yourself, ``OMP_NUM_THREADS`` (or ``--threads``) for the thread count.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

# Spin-wait iterations before a waiting OpenMP thread sleeps (libgomp's default is 300,000).
# Chosen with benchmarks/threads.py: see docs/benchmarks.md, "A busy machine".
SPIN_COUNT = 1000
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 ``cpu.max``
    or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) where one is set."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return min(cpus, quota) if quota else cpus


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


def apply_thread_defaults(environ: MutableMapping[str, str] = os.environ,
                          cgroup_root: Path = CGROUP_ROOT) -> dict[str, str]:
    """Before torch is loaded: set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user set a
    wait policy, and ``OMP_NUM_THREADS`` to the CPU quota where a cgroup quota is below the CPUs
    the process may run on (torch would otherwise start one thread per visible CPU).

    Returns what was set (nothing once torch is imported, when libgomp has read its environment).
    """
    if "torch" in sys.modules:
        return {}
    applied = {}
    if not any(name in environ for name in POLICY_VARIABLES):
        applied["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    quota = _cgroup_quota(cgroup_root)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in environ and quota and quota < affinity:
        applied["OMP_NUM_THREADS"] = str(max(1, math.floor(quota)))
    environ.update(applied)
    return applied


def warn_if_oversubscribed(threads: int, load: float | None = None) -> bool:
    """Warn when the OpenMP threads spin for long (the user's or libgomp's default policy) on a
    machine whose other processes already keep the CPUs busy: the slow case above.  ``load``
    defaults to the 1-minute load average.  Returns whether it warned."""
    if load is None:
        if not hasattr(os, "getloadavg"):
            return False
        load = os.getloadavg()[0]
    spin = os.environ.get("GOMP_SPINCOUNT")
    policy = os.environ.get("OMP_WAIT_POLICY", "").upper()
    long_spin = policy == "ACTIVE" or (policy != "PASSIVE" and not (spin and _spin_count(spin) <= 10 * SPIN_COUNT))
    if threads <= 1 or not long_spin or load + threads <= available_cpus() + 0.5:
        return False
    logger.warning("the machine is busy (load %.1f on %g CPUs) and torch's %d threads spin-wait for each other "
                   "(OMP_WAIT_POLICY/GOMP_SPINCOUNT): training can run many times slower; unset them, or set "
                   "GOMP_SPINCOUNT=%d or --threads 1", load, available_cpus(), threads, SPIN_COUNT)
    return True


def _spin_count(text: str) -> float:
    """libgomp's GOMP_SPINCOUNT syntax: a number with an optional k, M, G or T suffix, or "infinite"."""
    text = text.strip()
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(text[-1:], 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        return math.inf
