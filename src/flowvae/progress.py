"""What the trainer's progress shows: images per second over a recent window, and whether the
output is a terminal (bars) or a file (plain lines)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

WINDOW_S = 10.0  # images/s is measured over the last this many seconds
REFRESH_S = 1.0  # the bar's loss and images/s are refreshed this often


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress bars can be drawn on ``stream`` (default stderr); otherwise carriage returns and
    cursor codes would land in a log file, so plain lines are written instead."""
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def plain_line(text: str) -> None:
    """One line of progress on stderr, flushed (for logs that are not a terminal)."""
    print(text, file=sys.stderr, flush=True)


class Throughput:
    """Images per second over the last :data:`WINDOW_S` seconds of steps, and when to show it again.

    >>> t = Throughput(clock=iter([0.0, 1.0, 2.0, 3.0]).__next__)
    >>> t.add(100); t.add(100); t.add(100)
    >>> t.images_per_second()
    100.0
    """

    def __init__(
        self, window: float = WINDOW_S, refresh: float = REFRESH_S, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.window, self.refresh, self.clock = window, refresh, clock
        self.start = clock()
        self.marks: deque[tuple[float, int]] = deque([(self.start, 0)])  # (time, images so far)
        self.images = 0
        self.shown = -float("inf")

    def add(self, images: int) -> None:
        """One step of ``images`` has finished now."""
        self.images += images
        now = self.clock()
        self.marks.append((now, self.images))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.window:
            self.marks.popleft()

    def images_per_second(self) -> float:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def due(self) -> bool:
        """True at most once every :data:`REFRESH_S` seconds (and after the first step)."""
        now = self.marks[-1][0]
        if now - self.shown >= self.refresh:
            self.shown = now
            return True
        return False

    def seconds(self) -> float:
        """Seconds since this epoch began."""
        return self.marks[-1][0] - self.start
