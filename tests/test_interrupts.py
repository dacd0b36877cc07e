"""Ctrl-C and SIGTERM end a command even when the signal lands in a finalizer."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from flowvae.interrupts import Terminated, handled_interrupts, raise_pending


class SignalsInFinalizer:
    """Sends a signal to this process while it is being finalized: Python runs the handler inside
    ``__del__``, where a raised exception is only printed ("Exception ignored in ...")."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        for _ in range(10_000):  # the handler runs at one of these bytecodes, inside the finalizer
            pass


class RaisesInFinalizer:
    def __del__(self) -> None:
        raise ValueError("a finalizer's own error")


@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_check(signum, expected, monkeypatch):
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)  # what Python calls instead of raising
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with handled_interrupts():
        SignalsInFinalizer(signum)  # finalized at once: the handler's exception is swallowed
        assert printed == []  # not printed with a traceback: it is raised again below
        RaisesInFinalizer()
        assert [type(u.exc_value) for u in printed] == [ValueError]  # any other error is reported as before
        with pytest.raises(expected):
            raise_pending()
    raise_pending()  # nothing is pending once the block is left
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert sys.unraisablehook == printed.append


def test_an_interrupt_raises_where_the_program_is():
    with handled_interrupts(), pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):
            pass
