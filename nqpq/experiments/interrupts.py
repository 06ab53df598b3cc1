"""SIGTERM (a scheduler's kill) turned into a ``KeyboardInterrupt`` that carries its signal (``sigterm_interrupts``),
so that a run's cleanup is the same as for Ctrl-C, and the exit code of each interrupt (``exit_code``, 130 for SIGINT,
143 for SIGTERM, 128 + the signal's number)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a signal handler, carrying the signal (SIGTERM: exit 143, not 130)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(err: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C (a plain KeyboardInterrupt), 143 for SIGTERM."""
    return 128 + int(getattr(err, "signum", signal.SIGINT))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` in the main thread as SIGINT raises KeyboardInterrupt, so the
    same cleanup runs (checkpoint kept, results.json not written); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
