"""Folders that appear whole or not at all: build under a temporary name beside the target, then rename.

Used for everything we write that a crash must not leave half-done: checkpoints, final/, merged models, the
builtin model and the tokenized-data cache.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from neftune_cli.io.errors import RuntimeFailure, UsageError
from neftune_cli.io.outputs import foreign_entries, write_manifest

TMP_PREFIX = ".tmp-"
STALE_S = 3600  # temporary folders older than this are leftovers of a crash


@contextmanager
def atomic_dir(target: Path, *, is_complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block succeeds it becomes `target`.

    Without `is_complete`, an existing `target` is replaced (checkpoints, final/, merge --overwrite), but only when
    it holds nothing we did not write (see io/outputs.py): checked before the work and again before the swap.
    The new folder carries the manifest of what we wrote in it. With `is_complete` (shared caches that another
    process may be filling at the same time), a complete `target` wins and ours is
    discarded; an incomplete one is not ours (we only ever rename whole folders) and is replaced.
    On failure the temporary folder is removed and `target` is left as it was.
    """
    if is_complete is None:
        _check_ours(target)
    with _named_write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        with _named_write_errors(target, tmp):
            yield tmp
            write_manifest(tmp)
        if is_complete is not None and is_complete(target):
            return
        if is_complete is None:
            _check_ours(target)
        if target.exists() or target.is_symlink():
            old = target.with_name(f"{TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_ours(target: Path) -> None:
    if (target.exists() or target.is_symlink()) and (foreign := foreign_entries(target)):
        raise UsageError(f"{target} holds {foreign[0]!r}, which neftune did not write; move it away (nothing was "
                         "replaced)")


def clean_stale(parent: Path) -> None:
    """Remove temporary folders that crashed runs left in `parent`."""
    now = time.time()
    for p in parent.glob(f"{TMP_PREFIX}*"):
        try:
            if now - p.stat().st_mtime > STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def atomic_file(path: Path, *, binary: bool = False) -> Iterator[TextIO]:
    """A text (or binary) file open for writing beside `path`; it replaces `path` when the block succeeds."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with _named_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8") as f:
                yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _named_write_errors(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """A full disk or a folder we may not write names what we were writing, as the user will know it: a file in
    our temporary folder by its place under `target`."""
    try:
        yield
    except OSError as e:
        name = Path(str(e.filename)) if e.filename is not None else None
        if name is not None and not str(name).startswith(str(target.parent)):
            raise  # a file read elsewhere (say the base model) failed, not our write
        shown = target / name.relative_to(tmp) if name and tmp and name.is_relative_to(tmp) else target
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RuntimeFailure(f"disk full while writing {shown} (the write failed: {e.strerror})") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR):
            raise UsageError(f"cannot write {shown}: {e.strerror}") from None
        raise
