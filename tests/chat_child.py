"""`neftune chat` for tests/test_chat.py's pseudo-terminal, with one pause: the first answer's forward pass that
would make token PAUSE_AT + 1 creates GATE.waiting, then waits until the file GATE exists (it never does unless the
test creates it). So once GATE.waiting exists, the test sees the first PAUSE_AT tokens on the terminal while that
answer is certainly unfinished, and can press Ctrl-C there, with no timing involved.

Usage: python tests/chat_child.py GATE PAUSE_AT MODEL [chat options...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from neftune_cli.cli.app import main
from neftune_cli.infer.target import Target


def pausing_load(gate: Path, pause_at: int):
    real = Target.load
    calls = {"n": 0}

    def load(self, device, *, merge):
        model = real(self, device, merge=merge)

        def hook(module, args, kwargs):
            calls["n"] += 1
            if calls["n"] == pause_at + 1:  # call 1 is the prompt (it makes token 1); call k makes token k
                gate.with_suffix(".waiting").touch()
                while not gate.exists():
                    time.sleep(0.01)

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    return load


if __name__ == "__main__":
    gate, pause_at, *args = sys.argv[1:]
    Target.load = pausing_load(Path(gate), int(pause_at))
    main(["chat", *args])
