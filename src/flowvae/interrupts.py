"""Ctrl-C and SIGTERM that always end a ``flowvae`` command.

Python raises KeyboardInterrupt in whatever Python code runs when the signal arrives.  If that is a
finalizer or a weakref callback (run by the garbage collector at any allocation), Python only prints
"Exception ignored in ..." with a traceback and carries on, and a training loop would then run to its
end.  Under :func:`handled_interrupts` the signal is also remembered, and :func:`raise_pending`, called
at every training step and evaluation batch, raises it again where it cannot be lost; the swallowed
copy is not printed (``sys.unraisablehook`` passes only other exceptions on).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending: type[KeyboardInterrupt] | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job), raised where the program is so that it ends like Ctrl-C:
    temporaries removed, the lock released, one line saying how to resume."""


def _interrupt(signum: int, frame: object) -> None:
    global _pending
    _pending = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    raise _pending()


def raise_pending() -> None:
    """Raise the interrupt received under :func:`handled_interrupts`, if any (a no-op otherwise)."""
    if _pending is not None:
        raise _pending()


@contextmanager
def handled_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (SIGTERM: :class:`Terminated`) and are remembered
    for :func:`raise_pending`; the previous handlers come back on exit.  Only on the main thread
    (elsewhere signals cannot be handled): a no-op there."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook

    def unraisable(report: sys.UnraisableHookArgs) -> None:
        if _pending is None or not isinstance(report.exc_value, _pending):  # ours is raised again: not printed
            previous_hook(report)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _pending = None
