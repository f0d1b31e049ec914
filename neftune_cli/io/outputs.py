"""The output policy every command that writes follows, and the manifest that tells our files from the user's.

- Never write onto an input of the same command, nor into a run or model folder that command did not create.
- Never replace an existing file without --overwrite.
- --overwrite replaces a folder only when every file in it, at every depth, is one we wrote: atomic_dir lists
  the files of each folder it creates in MANIFEST, and anything that list does not name (a user's notes, a
  symlink, a model another command wrote inside it) makes the folder not ours to delete.
Every refusal is a UsageError (exit 2) that names the path and the flag, raised before anything is deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from neftune_cli.io.errors import UsageError

MANIFEST = ".neftune-manifest.json"  # in every folder atomic_dir creates: the files we wrote there
RUN_MARKER = "neftune-run.json"  # what makes a folder one of train's run directories


def write_manifest(folder: Path) -> None:
    """List every file under `folder` (relative paths, at every depth) as ours."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not p.is_symlink() and p != folder / MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=0) + "\n", encoding="utf-8")


def manifest_files(folder: Path) -> set[str] | None:
    """The files our manifest in `folder` lists; None when it has none (not a folder we created) or it is broken."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(f) for f in files} if isinstance(files, list) else None


def foreign_entries(folder: Path) -> list[str]:
    """What under `folder` (relative paths, at every depth) our manifest does not list: every entry if it has none.
    Symlinks are never ours (we write none) and are not followed."""
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    ours = manifest_files(folder)
    if ours is None:
        return sorted(p.name for p in folder.iterdir())
    ours.add(MANIFEST)
    parents = {p.as_posix() for f in ours for p in Path(f).parents}
    foreign = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in sorted(dirs):
            path = (rel / name).as_posix()
            if (Path(root) / name).is_symlink() or path not in parents:
                foreign.append(path)
        dirs[:] = [d for d in dirs if (rel / d).as_posix() in parents and not (Path(root) / d).is_symlink()]
        foreign += [(rel / f).as_posix() for f in sorted(files)
                    if (rel / f).as_posix() not in ours or (Path(root) / f).is_symlink()]
    return foreign


def owner(path: Path) -> Path | None:
    """The nearest folder above `path` that one of our commands created (a run, a checkpoint, a model)."""
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / MANIFEST).is_file() or (parent / RUN_MARKER).is_file():
            return parent
    return None


def check_output_file(path: Path, *, overwrite: bool, inputs: Iterable[Path] = (), flag: str = "--out") -> None:
    """`path` may be written by a command whose inputs are `inputs` (files or folders)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give the path of the file to write")
    parent = Path(os.path.abspath(path)).parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"{flag} {path}: {above} is a file, not a folder")
            break
    check_not_input(path, inputs, flag)
    _check_not_inside_ours(path, flag)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"{flag} {path} exists; pass --overwrite to replace it")


def check_output_dir(path: Path, *, overwrite: bool, inputs: Iterable[Path] = (), flag: str = "--out") -> None:
    """`path` may become a folder of ours: new, or (with --overwrite) one we wrote holding nothing else."""
    path = Path(path).expanduser()
    check_not_input(path, inputs, flag)
    _check_not_inside_ours(path, flag)
    check_replaceable(path, overwrite=overwrite, flag=flag)


def _check_not_inside_ours(path: Path, flag: str) -> None:
    if (folder := owner(path)) is not None:
        raise UsageError(f"{flag} {path} is inside {folder}, a folder neftune wrote for another command; write "
                         "outside it")


def check_replaceable(path: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """An existing `path` may be replaced: --overwrite was given and every file in it is one we wrote."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder neftune wrote; choose a new path")
    if not overwrite:
        raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if foreign := foreign_entries(path):
        legacy = " (or one written before neftune kept manifests: delete it yourself)" \
            if manifest_files(path) is None else ""
        raise UsageError(f"{flag} {path} holds {foreign[0]!r}, which neftune did not write there; --overwrite "
                         f"replaces only folders holding nothing but what we wrote{legacy} (nothing was changed)")


def check_not_input(path: Path, inputs: Iterable[Path], flag: str = "--out") -> None:
    """`path` is none of `inputs`, inside none of them, and holds none of them."""
    mine = Path(os.path.realpath(path))
    for source in inputs:
        theirs = Path(os.path.realpath(source))
        if mine == theirs or theirs in mine.parents or mine in theirs.parents:
            raise UsageError(f"{flag} {path} is an input of this command (or inside or around one: {source}); "
                             "write elsewhere")
