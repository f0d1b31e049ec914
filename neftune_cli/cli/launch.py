"""`neftune train ... --nproc N`: this machine's processes through torchrun, with our exit codes kept."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from neftune_cli.io.console import debug_requested, log
from neftune_cli.io.errors import EXIT_RUNTIME

# Each rank writes how it ended into this folder (see cli.app.main): torchrun reports any failure as 1.
EXIT_CODE_DIR = "NEFTUNE_EXIT_CODE_DIR"


def run_torchrun(nproc: int) -> None:
    """`neftune train ... --nproc N` is `torchrun --standalone --nproc_per_node N -m neftune_cli train ...`, with
    our exit codes: torchrun reports any failure as 1, so each rank leaves its own code in a file for us."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--nproc":
            skip = not skip
            continue
        if not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "neftune_cli", *args]
    log(f"running: {shlex.join(command[1:])}")
    debug = debug_requested(args)
    with tempfile.TemporaryDirectory(prefix="neftune-exit-") as codes:
        child = subprocess.Popen(command, env={**os.environ, EXIT_CODE_DIR: codes},
                                 stderr=None if debug else subprocess.PIPE, text=True, errors="replace")
        # A scheduler's SIGTERM may reach only us: pass it on (torchrun passes it to every rank).
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the ranks through the terminal already
        held = [] if debug else _relay_ranks(child.stderr)
        launcher = child.wait()
        ranks = [int(p.read_text()) for p in Path(codes).iterdir()]
    failed = [c for c in ranks if c]
    # a specific code (2 usage, 130/143 signals) over the generic 1 of ranks that failed because another did
    code = next((c for c in failed if c != EXIT_RUNTIME), failed[0] if failed else launcher)
    if code in (0, EXIT_RUNTIME) or not failed:  # torchrun's report helps only where our ranks said nothing specific
        sys.stderr.writelines(held)
    sys.exit(code)


# torchrun's own log lines ("W1203 12:00:00.123 4567 torch/distributed/...] ...")
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/")


def _relay_ranks(stream) -> list[str]:
    """Pass the ranks' lines (they share torchrun's stderr) on as they come; hold torchrun's own log lines and the
    ChildFailedError traceback it prints after the ranks have ended, for run_torchrun to drop where a rank has
    already said what went wrong (one error line, not a traceback after it)."""
    held: list[str] = []
    tail = False  # from torchrun's traceback on, everything is its report
    for line in stream:
        tail = tail or line.startswith("Traceback (most recent call last)")
        if tail or _TORCHRUN_LOG.match(line):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    return held
