"""Where neftune-cli keeps what it can rebuild: the builtin models and tokenized data ($NEFTUNE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("NEFTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neftune-cli"
