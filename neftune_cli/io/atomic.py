"""Folders that appear whole or not at all: build under a temporary name beside the target, then rename.

Used for everything we write that a crash must not leave half-done: checkpoints, final/, merged models, the
builtin model and the tokenized-data cache.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
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
OWNER_FILE = ".neftune-owner"  # in a temporary folder while it is written: the process writing it
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
        claim(tmp)
    try:
        with _named_write_errors(target, tmp):
            yield tmp
            (tmp / OWNER_FILE).unlink(missing_ok=True)
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
    """Remove temporary folders that killed processes left in `parent` (kill -9, a SIGTERM outside training):
    those whose owner is dead at once, those without a readable owner when older than STALE_S. Another process's
    write in progress is left alone."""
    now = time.time()
    for p in parent.glob(f"{TMP_PREFIX}*"):
        try:
            alive = owner_alive(p) if p.is_dir() and not p.is_symlink() else None
            if alive is False or (alive is None and now - p.stat().st_mtime > STALE_S):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except OSError:
            pass


def claim(folder: Path, name: str = OWNER_FILE) -> None:
    """Mark `folder` as this process's work in progress: {"pid", "host"} (see owner_alive)."""
    (folder / name).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def owner_alive(folder: Path, name: str = OWNER_FILE) -> bool | None:
    """Whether the process that claimed `folder` still runs; None when that cannot be told (no owner file, or
    another host)."""
    try:
        info = json.loads((folder / name).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or pid <= 0:
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    except OSError:
        return None
    return True


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
