"""Writing: the output checks, the streamed shards and the side files."""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from neftune_cli.io import faults
from neftune_cli.io import safetensors_io as st
from neftune_cli.io.atomic import STALE_S, TMP_PREFIX, owner_alive
from neftune_cli.io.atomic import claim as atomic_claim
from neftune_cli.io.errors import RuntimeFailure, UsageError
from neftune_cli.io.outputs import check_output_dir
from neftune_cli.merge.common import (
    SAFE_INDEX,
    TOKENIZER_DIRS,
    TOKENIZER_FILES,
    TOKENIZER_MARKERS,
    fmt_bytes,
)
from neftune_cli.merge.tensors import produce
from neftune_cli.models.serving_files import CONFIG, GENERATION, loadable_config

if TYPE_CHECKING:
    from neftune_cli.merge.base import BaseCheckpoint
    from neftune_cli.merge.plan import Plan

_OWNER_FILE = ".neftune-merge-owner"  # in a merge's temporary folder: {"pid", "host"} of the process writing it


def check_out(out: Path, overwrite: bool, inputs: Iterable[Path]) -> None:
    """The output policy of io/outputs.py: not an input, not inside another of our folders, and an existing
    folder replaced only with --overwrite when it is a merged model (or anything else) we wrote, and nothing more."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a directory")
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    if not out.parent.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {out.parent}: {e.strerror or e}") from None
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} is not a directory")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"output folder {out.parent} is not writable")


def remove_stale_temps(out: Path, log: Callable[[str], None]) -> None:
    """Remove the temporary folders that earlier merges into ``out`` left beside it when killed (kill -9, power loss).

    Only ours and only for this target: ``.tmp-<out name>-XXXXXXXX``, the names ``atomic_dir`` gives. A folder whose
    owner file names a process that is still alive on this host is another merge at work and is left alone; one
    without an owner file (killed before writing it, or written on another host) goes only when older than
    ``atomic.STALE_S``.
    """
    pattern = re.compile(rf"{re.escape(TMP_PREFIX + out.name)}-[a-z0-9_]{{8}}")
    removed = []
    for p in out.parent.iterdir():
        if not pattern.fullmatch(p.name) or not p.is_dir() or p.is_symlink():
            continue
        alive = _owner_alive(p)
        try:
            old = time.time() - p.stat().st_mtime > STALE_S
        except OSError:
            continue
        if alive is False or (alive is None and old):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        log(f"removed {len(removed)} temporary folder(s) that an interrupted merge left beside {out}: "
            f"{', '.join(removed)}")


def claim(tmp: Path) -> None:
    """Mark ``tmp`` as this process's work in progress (see remove_stale_temps)."""
    atomic_claim(tmp, _OWNER_FILE)


def release(tmp: Path) -> None:
    (tmp / _OWNER_FILE).unlink(missing_ok=True)


def _owner_alive(tmp: Path) -> bool | None:
    """Whether the process that owns ``tmp`` is still running; None when that cannot be told."""
    return owner_alive(tmp, _OWNER_FILE)


def _write_failure(e: OSError, path: Path | str) -> RuntimeFailure:
    """One line for a failed write; a full disk (or quota) is named as such."""
    if e.errno == errno.ENOSPC:
        return RuntimeFailure(f"disk full while writing {path} (the write failed: {e.strerror or e})")
    if e.errno == errno.EDQUOT:
        return RuntimeFailure(f"disk quota exceeded while writing {path} (the write failed: {e.strerror or e})")
    return RuntimeFailure(f"writing {path} failed: {e.strerror or e}")


def check_disk_space(folder: Path, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    need = int(nbytes * 1.02) + 50 * 2**20
    if free < need:
        raise RuntimeFailure(
            f"not enough disk space in {folder}: the merged model needs about {fmt_bytes(need)}, "
            f"{fmt_bytes(free)} free"
        )


def write_model(
    plan: Plan, base: BaseCheckpoint, folder: Path, log: Callable[[str], None], out: Path | None = None
) -> None:
    """Write the shards (and their index) into ``folder``; messages name the files as ``out`` (the final folder)."""
    shown = out or folder
    reader = st.Reader()
    weight_map: dict[str, str] = {}
    try:
        for i, (shard, fname) in enumerate(zip(plan.shards, plan.shard_names, strict=True)):
            items = []
            for o in shard:
                weight_map[o.name] = fname
                if not o.modified and o.src is not None and o.src.dtype == o.st_dtype:
                    writer = lambda f, e=o.src: reader.copy_to(e, f)  # noqa: E731
                else:
                    writer = lambda f, o=o: f.write(st.tensor_bytes(produce(o, reader, plan.out_dtype)))  # noqa: E731
                items.append((o.name, o.st_dtype, o.shape, writer))
            try:
                st.write_shard(folder / fname, items, {"format": "pt"})
            except OSError as e:
                raise _write_failure(e, shown / fname) from None
            if i == 0:
                faults.checkpoint("merge-write")
            merged = sum(1 for o in shard if o.merged)
            replaced = sum(1 for o in shard if o.replacement is not None)
            extra = f", {replaced} replaced" if replaced else ""
            log(
                f"shard {i + 1}/{len(plan.shards)}: {fname} ({len(shard)} tensors, {merged} merged{extra}, "
                f"{fmt_bytes(sum(o.nbytes for o in shard))})"
            )
            gc.collect()
    finally:
        reader.close()
    if len(plan.shards) > 1:
        params = sum(math.prod(o.shape) for o in plan.outputs)
        index = {"metadata": {"total_parameters": params, "total_size": plan.total_bytes}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_side_files(plan: Plan, base: BaseCheckpoint, adapter_dir: Path, given: Path, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    # a run's own generation config first: it also stops on the template's end-of-turn token
    generation = next((d / GENERATION for d in (adapter_dir, base.path) if (d / GENERATION).is_file()), None)
    if generation is not None:
        shutil.copyfile(generation, folder / GENERATION)
    if plan.config.get("auto_map"):  # custom modeling code travels with the model
        for py in base.path.glob("*.py"):
            shutil.copyfile(py, folder / py.name)
    candidates = [adapter_dir, given, base.path]
    src = next((d for d in candidates if any((d / m).is_file() for m in TOKENIZER_MARKERS)), None)
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    if (folder / CONFIG).is_file():  # a run's is loadable already; a base saved by transformers 5 may not be
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        (folder / CONFIG).write_text(json.dumps(loadable_config(config), indent=2, ensure_ascii=False) + "\n")
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, folder / name)
