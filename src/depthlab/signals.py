"""Ctrl-C and SIGTERM as a request to stop at the next safe point.

Inside `deferred_stop()` the first SIGINT or SIGTERM only records itself; the loop that opened it checks the request
at a safe point (the trainer: after a step), saves what is resumable and raises `depthlab.errors.Interrupted`. A
second signal interrupts at once (KeyboardInterrupt), for a user who does not want to wait. Elsewhere the CLI turns
SIGTERM into KeyboardInterrupt (`terminate_as_interrupt`), so every command stops on SIGTERM as it does on Ctrl-C:
work finished so far (saved metrics, finished study runs) is kept and the CLI prints the command that resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """Set to the name of the first signal received (SIGINT or SIGTERM); false until then."""

    def __init__(self):
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return

    def handler(signum, _frame):
        if stop:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While open, SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt
