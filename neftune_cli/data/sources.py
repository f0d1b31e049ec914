"""Read a source's raw records: local .json/.jsonl/.parquet/.csv files, folders of them, or hub datasets.

Each record comes with where it came from (``file: line 12`` for JSON lines, ``file: record 5`` otherwise,
0-based) so every later error can name it. A line that is not UTF-8 or not valid JSON is a bad record (it can
be skipped); a whole file that cannot be parsed is a DataError at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from neftune_cli.io.errors import DataError, first_line
from neftune_cli.recipe.schema import SourceSection

EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
# Files larger than this are identified by size and mtime instead of a content hash (hashing would dominate).
HASH_LIMIT_BYTES = 512 * 2**20


def looks_like_path(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name`` without a file extension; everything else is meant as a path."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return Path(path).suffix.lower() in {*EXTENSIONS, ".yaml", ".txt"}


@dataclass(frozen=True)
class RawRecord:
    where: str  # "path: line 3" / "path: record 5"
    value: Any  # the parsed record (normally a dict); None when problem is set
    problem: str | None = None  # why the record could not even be parsed


class Source:
    """One entry of data.sources / data.eval_sources: a local file, a folder of files, or a hub dataset."""

    def __init__(self, spec: SourceSection):
        self.spec = spec
        self.local = Path(spec.path).exists()

    @property
    def name(self) -> str:
        return self.spec.path

    @cached_property
    def files(self) -> list[Path]:
        path = Path(self.spec.path)
        if path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise DataError(
                    f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}"
                )
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{path}: the folder holds no {', '.join(EXTENSIONS)} files")
        return files

    @cached_property
    def hub_dataset(self):
        """The hub dataset split, loaded through datasets (works offline when it is in the local HF cache)."""
        import datasets

        try:
            return datasets.load_dataset(self.spec.path, split=self.spec.split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the first line of any
            offline = any(
                os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
            )
            hint = "; offline and not in the local Hugging Face cache" if offline else ""
            split = self.spec.split
            raise DataError(f"{self.name}: cannot load hub dataset (split {split}){hint}: {first_line(e)}") from None

    def identity(self) -> list:
        """What the records depend on, for the cache fingerprint: content hashes, not paths."""
        if not self.local:
            ds = self.hub_dataset
            return [self.name, self.spec.split, [_file_identity(Path(f["filename"])) for f in ds.cache_files]]
        root = Path(self.spec.path)
        out = []
        for f in self.files:
            with _readable(f):
                out.append([str(f.relative_to(root)) if f != root else f.name, _file_identity(f)])
        return out

    def records(self) -> Iterator[RawRecord]:
        """The first max_samples raw records, bad ones included."""
        limit = self.spec.max_samples
        count = 0
        for record in self._all_records():
            if limit is not None and count >= limit:
                return
            count += 1
            yield record

    def _all_records(self) -> Iterator[RawRecord]:
        if not self.local:
            where = f"{self.name} [{self.spec.split}]"
            for i, value in enumerate(self.hub_dataset):
                yield RawRecord(f"{where}: record {i}", value)
            return
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        for path in self.files:
            with _readable(path):
                yield from readers[path.suffix.lower()](path)


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """An OS error while reading a data file (permissions, a vanished file, an I/O error) names the file."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or first_line(e)})") from None


def _file_identity(path: Path) -> list:
    stat = path.stat()
    if stat.st_size > HASH_LIMIT_BYTES:
        return ["size+mtime", stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return ["sha256", digest.hexdigest()]


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}: line {number}"
            if not raw.strip():
                continue
            try:
                text = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(where, None, f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            try:
                yield RawRecord(where, json.loads(text))
            except json.JSONDecodeError as e:
                yield RawRecord(where, None, f"malformed JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path) -> Iterator[RawRecord]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (invalid byte at offset {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many published ".json" files are really JSON lines; read them as such rather than fail.
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got a {type(value).__name__} (or use .jsonl)")
    for i, item in enumerate(value):
        yield RawRecord(f"{path}: record {i}", item)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read parquet: {str(e).splitlines()[0]}") from None
    for i, item in enumerate(table.to_pylist()):
        yield RawRecord(f"{path}: record {i}", item)


def _read_csv(path: Path) -> Iterator[RawRecord]:
    """A row with more or fewer fields than the header is a bad record named by its line (csv.DictReader would
    keep extra fields under a nameless key and fill missing ones with None)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (invalid byte at offset {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None
    for i, (line, row) in enumerate(r for r in rows if r[1]):
        where = f"{path}: record {i} (line {line})"
        if len(row) != len(header):
            yield RawRecord(where, None, f"{len(row)} fields where the header has {len(header)}")
        else:
            yield RawRecord(where, dict(zip(header, row, strict=True)))
