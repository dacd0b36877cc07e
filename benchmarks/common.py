"""Helpers shared by the benchmark scripts: timing, machine description, result files.

Not a test module and not part of the package; the scripts import it as ``common`` because
Python puts a script's own folder on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Seconds per call: the median over ``repeats`` blocks of ``number`` calls, and the quartiles."""

    median: float
    q1: float
    q3: float
    repeats: int
    number: int

    @property
    def ms(self) -> float:
        return 1e3 * self.median


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def use_clock(name: str) -> None:
    """'wall' (``perf_counter``, the default) or 'cpu' (``process_time``: CPU seconds of this process).

    On a machine shared with other busy processes, 'cpu' with one thread still measures the work
    itself (a descheduled thread does not count); with several threads it also counts their
    spin-waits, so use it with ``--threads 1``.
    """
    global clock
    clock = CLOCKS[name]


def measure(
    fn: Callable[[], object],
    budget_s: float = 1.0,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 50,
    block_s: float = 0.02,
) -> Timing:
    """Time ``fn`` on the chosen clock (:func:`use_clock`): warm-up, then blocks of calls, median per call.

    The first call is a warm-up (it pays for lazy initialisation); a second, timed call decides
    the block size (enough calls for ``block_s`` seconds) and the number of blocks (as many as fit
    in ``budget_s``, between ``min_repeats`` and ``max_repeats``).  A call that alone takes longer
    than ``budget_s`` is not repeated: that second call is the one measurement (``repeats=1``),
    which caps slow sequential loops at two calls.
    """
    fn()
    start = clock()
    fn()
    once = clock() - start
    if once > budget_s:
        return Timing(once, once, once, 1, 1)
    for _ in range(warmup - 1):
        fn()
    number = max(1, int(block_s / max(once, 1e-9)))
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(once * number, 1e-9))))
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            fn()
        times.append((clock() - start) / number)
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q1, q3, repeats, number)


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (default: every core this process may use) and return the count."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) since boot / start."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / ticks, own.user + own.system


class OtherLoad:
    """How many cores *other* processes kept busy between ``start()`` and ``stop()`` (Linux only).

    A benchmark shares the machine with whatever else runs; this number says how much it had to
    share, so that a slow result can be told from a busy machine.
    """

    def __init__(self) -> None:
        self.begin: tuple[float, float, float] | None = None

    def start(self) -> OtherLoad:
        try:
            self.begin = (time.monotonic(), *_cpu_seconds())
        except (OSError, ValueError, IndexError):
            self.begin = None
        return self

    def stop(self) -> float | None:
        if self.begin is None:
            return None
        t0, busy0, own0 = self.begin
        busy1, own1 = _cpu_seconds()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(time.monotonic() - t0, 1e-9))


def wait_until_quiet(max_wait_s: float, threshold: float = 0.2, window_s: float = 5.0) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes use under ``threshold`` cores over a window.

    Returns the cores they used in the last window, or None where /proc/stat is not readable.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = OtherLoad().start()
        time.sleep(window_s)
        load = probe.stop()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load
        print(f"waiting for a quiet machine: other processes use {load:.2f} cores", file=sys.stderr)


def warn_if_busy(threads: int) -> None:
    """Say so on stderr when other processes already keep the cores busy: the timings would be too slow."""
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(
            f"warning: 1-minute load average is {os.getloadavg()[0]:.2f} before the benchmark starts; "
            f"other processes compete for the {threads} thread(s) and will inflate wall-clock timings "
            "(--clock cpu --threads 1 is robust to that)",
            file=sys.stderr,
        )


def machine_line(info: dict) -> str:
    line = (
        f"{info['cpu']}, {info['cores_visible']} cores visible, torch {info['torch']}, "
        f"{info['torch_threads']} threads, Python {info['python']}, {info['date']}"
    )
    if info.get("other_processes_cores") is not None:
        line += f"; other processes kept {info['other_processes_cores']:.2f} cores busy on average during the run"
    return line


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def _jsonable(value: object) -> object:
    if isinstance(value, Timing):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def report(default_name: str, args, info: dict, threads: int, results: dict, render, load: OtherLoad) -> None:
    """Print a benchmark's table and save it (JSON + Markdown) unless it was a --quick smoke run."""
    info["other_processes_cores"] = load.stop()
    text = render(results, info, args)
    print(text)
    if args.quick and args.out is None:
        print("\n(--quick: results not saved; pass --out NAME to keep them)", file=sys.stderr)
        return
    paths = save(args.out or default_name, {"machine": info, "threads": threads, "args": vars(args), **results}, text)
    print(f"\nsaved {paths[0]} and {paths[1]}", file=sys.stderr)


def start(args) -> tuple[int, dict, OtherLoad]:
    """Threads, clock, an optional wait for a quiet machine, the machine line; then start watching the load."""
    threads = set_threads(args.threads)
    info = machine()
    use_clock(args.clock)
    if args.wait_quiet > 0:
        wait_until_quiet(args.wait_quiet)
    print(f"# {machine_line(info)}", file=sys.stderr)
    warn_if_busy(threads)
    return threads, info, OtherLoad().start()
