"""Stopping a run cleanly: a signal ends the current step, a checkpoint is saved, and the run can resume."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass

from neftune_cli.io.console import log


@dataclass
class StopRequest:
    signum: int | None = None  # the signal that asked to stop; None while none has


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves and exits. A second SIGINT stops at once."""
    stop = StopRequest()

    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
