"""Streaming safetensors: read one tensor at a time, write shards tensor by tensor.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; merging a 70B model shard by shard
must not. The writer here produces byte-identical files (same header, same layout); the reader uses plain reads,
not mmap, so memory is exactly what we hold.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neftune_cli.io.errors import RuntimeFailure, UsageError

# safetensors dtype name -> (torch dtype or None, item size in bytes, sort rank used by safetensors' writer).
# The rank is the position in safetensors' Rust `Dtype` enum: `save_file` lays tensors out by (rank descending, name),
# which keeps every tensor aligned to its item size. We reproduce that layout exactly.
ST_DTYPES: dict[str, tuple[torch.dtype | None, int, int]] = {
    "BOOL": (torch.bool, 1, 0),
    "U8": (torch.uint8, 1, 4),
    "I8": (torch.int8, 1, 5),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1, 6),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1, 7),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1, 8),
    "I16": (torch.int16, 2, 9),
    "U16": (getattr(torch, "uint16", None), 2, 10),
    "F16": (torch.float16, 2, 11),
    "BF16": (torch.bfloat16, 2, 12),
    "I32": (torch.int32, 4, 13),
    "U32": (getattr(torch, "uint32", None), 4, 14),
    "F32": (torch.float32, 4, 15),
    "C64": (getattr(torch, "complex64", None), 8, 16),
    "F64": (torch.float64, 8, 17),
    "I64": (torch.int64, 8, 18),
    "U64": (getattr(torch, "uint64", None), 8, 19),
}

COPY_CHUNK = 64 * 1024 * 1024
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header




@dataclass
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, after the format's own checks; a damaged file is a UsageError naming it.

    The checks: an 8-byte header length, a JSON object header that fits in the file (and under safetensors' own
    100 MB limit), every tensor's byte range inside the data and of the size its dtype and shape say, and the data
    exactly covered (a cut-off download fails the last two).
    """
    bad = UsageError(f"{path}: not a valid safetensors file (truncated or corrupt)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise bad
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > MAX_HEADER:
                raise bad
            header = json.loads(f.read(n))
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError:  # invalid JSON or UTF-8
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    data = size - 8 - n
    entries, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad
        offsets, shape, dt = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(x, int) for x in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise bad
        if dt not in ST_DTYPES:
            raise UsageError(f"{path}: tensor {name} has unsupported dtype {dt}")
        nbytes = offsets[1] - offsets[0]
        if nbytes != math.prod(shape) * ST_DTYPES[dt][1]:
            raise bad
        entries[name] = TensorEntry(path, dt, tuple(shape), 8 + n + offsets[0], nbytes)
        end = max(end, offsets[1])
    if end != data:
        raise bad
    return entries


class Reader:
    """Reads tensors from safetensors files with plain reads (no mmap: memory stays what we hold)."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def _fh(self, path: Path):
        fh = self._files.get(path)
        if fh is None:
            fh = self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return fh

    def read(self, entry: TensorEntry) -> torch.Tensor:
        tdtype = ST_DTYPES[entry.dtype][0]
        if tdtype is None:
            raise UsageError(f"{entry.file}: dtype {entry.dtype} is not supported by this torch build")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=tdtype)
        buf = bytearray(entry.nbytes)
        fh = self._fh(entry.file)
        fh.seek(entry.start)
        if fh.readinto(buf) != entry.nbytes:
            raise RuntimeFailure(f"{entry.file}: unexpected end of file while reading a tensor")
        return torch.frombuffer(buf, dtype=tdtype).reshape(entry.shape)

    def copy_to(self, entry: TensorEntry, dst) -> None:
        fh = self._fh(entry.file)
        fh.seek(entry.start)
        remaining = entry.nbytes
        while remaining:
            chunk = fh.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise RuntimeFailure(f"{entry.file}: unexpected end of file while copying a tensor")
            dst.write(chunk)
            remaining -= len(chunk)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def tensor_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


def header_bytes(items: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The exact header bytes ``safetensors.torch.save_file`` writes for these (already laid out) tensors."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dt, shape in items:
        n = math.prod(shape) * ST_DTYPES[dt][1]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, items: list[tuple[str, str, tuple[int, ...], Callable]], metadata: dict[str, str]):
    """Write one safetensors file; ``items`` are (name, st_dtype, shape, writer) and each writer(fileobj) writes
    exactly that tensor's bytes. Layout and header are identical to ``safetensors.torch.save_file``."""
    laid_out = sorted(items, key=lambda it: (-ST_DTYPES[it[1]][2], it[0]))  # safetensors' own layout order
    with open(path, "wb") as f:
        f.write(header_bytes([(n, d, s) for n, d, s, _ in laid_out], metadata))
        for name, dt, shape, writer in laid_out:
            before = f.tell()
            writer(f)
            expected = math.prod(shape) * ST_DTYPES[dt][1]
            if f.tell() - before != expected:
                raise RuntimeError(f"internal error: {name} wrote {f.tell() - before} bytes, expected {expected}")
