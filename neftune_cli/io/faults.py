"""A test hook for fault-injection tests: make a process stop at a named point so a test can signal or kill it there.

``checkpoint(name)`` does nothing unless the environment variable ``NEFTUNE_TEST_PAUSE_AT`` equals ``name``. Then it
touches the file named by ``NEFTUNE_TEST_PAUSE_FILE`` (the test waits for it) and sleeps until the process is
killed or the test removes that file (a signal whose handler only sets a flag does not end the pause), at most 60
seconds, after which it returns and the process carries on. No sleeps in tests, no races: the test knows the process
is exactly there.

``crash_point(name)`` raises instead, in the process that ``NEFTUNE_TEST_CRASH_AT`` names.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "NEFTUNE_TEST_PAUSE_AT"
CRASH_AT = "NEFTUNE_TEST_CRASH_AT"
PAUSE_FILE = "NEFTUNE_TEST_PAUSE_FILE"
MAX_PAUSE_S = 60.0


def checkpoint(name: str) -> None:
    """Pause here when ``NEFTUNE_TEST_PAUSE_AT`` names this point (tests only; a no-op otherwise)."""
    if os.environ.get(PAUSE_AT) != name:
        return
    ready = os.environ.get(PAUSE_FILE)
    if ready:
        Path(ready).touch()
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline and not (ready and not Path(ready).exists()):  # the test removed it: go on
        time.sleep(0.05)


def crash_point(name: str) -> None:
    """Raise here when ``NEFTUNE_TEST_CRASH_AT`` names this point, as ``name`` or ``name@RANK`` (one torchrun
    process only): a failure on one rank, for the tests of how the others stop."""
    wanted = os.environ.get(CRASH_AT)
    if wanted and wanted in (name, f"{name}@{os.environ.get('RANK', '0')}"):
        raise RuntimeError(f"fault injected at {name}")
