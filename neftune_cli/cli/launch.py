"""`neftune train ... --nproc N`: this machine's processes through torchrun, with our exit codes kept."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from neftune_cli.io.console import log
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
    with tempfile.TemporaryDirectory(prefix="neftune-exit-") as codes:
        child = subprocess.Popen(command, env={**os.environ, EXIT_CODE_DIR: codes})
        # A scheduler's SIGTERM may reach only us: pass it on (torchrun passes it to every rank).
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the ranks through the terminal already
        launcher = child.wait()
        ranks = [int(p.read_text()) for p in Path(codes).iterdir()]
    failed = [c for c in ranks if c]
    # a specific code (2 usage, 130/143 signals) over the generic 1 of ranks that failed because another did
    sys.exit(next((c for c in failed if c != EXIT_RUNTIME), failed[0] if failed else launcher))
