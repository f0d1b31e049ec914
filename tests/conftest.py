"""Shared fixtures. Everything runs offline, and nothing is written outside pytest's temporary folders.

- ``neftune_cache`` (session, autouse): a temporary cache root exported as ``NEFTUNE_CACHE``.
- ``tracker_dirs`` (session, autouse): TRACKIO_DIR, WANDB_DIR and WANDB_CACHE_DIR in temporary folders.
- ``tiny_model_dir`` (session): the ``builtin:tiny-llama`` folder, materialised once per session into a
  temporary cache; ``NEFTUNE_CACHE`` points at that cache for the whole session, so a recipe or CLI run that
  says ``builtin:tiny-llama`` reuses it (and never touches ``~/.cache``).
- ``tiny_tokenizer`` (session): ``AutoTokenizer.from_pretrained(tiny_model_dir)``. Shared: do not mutate it.
- ``shared_data``: ``<repo>/../shared/data`` (real-world reference files); the test is skipped when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neftune_cli.demo import builtin

REPO_ROOT = Path(__file__).resolve().parents[1]

# Offline for the whole session, set before any test imports transformers / datasets / huggingface_hub.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"


@pytest.fixture(scope="session", autouse=True)
def neftune_cache(tmp_path_factory) -> Path:
    """A session-wide cache root, exported as ``NEFTUNE_CACHE`` for every test (restored at the end).

    Autouse and cheap (it builds nothing), so even a test that does not ask for ``tiny_model_dir`` but runs
    ``builtin:tiny-llama`` builds into (or reuses) this cache and never writes to ``~/.cache``.
    """
    root = tmp_path_factory.mktemp("neftune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEFTUNE_CACHE", str(root))
        yield root


@pytest.fixture(scope="session", autouse=True)
def tracker_dirs(tmp_path_factory) -> None:
    """Trackio and W&B write their local stores and logs under the session's temporary folder, never into ~/.cache
    (Trackio reads TRACKIO_DIR once, when first imported, which no test does before this)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
        mp.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
        mp.setenv("WANDB_CACHE_DIR", str(tmp_path_factory.mktemp("wandb-cache")))  # wandb-core's debug logs
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(neftune_cache) -> Path:
    """The materialised ``builtin:tiny-llama`` folder (config, safetensors, tokenizer), built once."""
    return builtin.materialize("tiny-llama", root=neftune_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def shared_data() -> Path:
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared reference data not found at {path}")
    return path


@pytest.fixture
def cli(capsys):
    """Run the `neftune` entry point in-process: ``code, stdout, stderr = cli("validate", path)``."""
    from neftune_cli.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run
