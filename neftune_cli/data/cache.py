"""The data fingerprint and the tokenized-data cache under ``$NEFTUNE_CACHE/data/<fingerprint>/``.

The fingerprint covers everything that affects the tokens and nothing else: the data section (minus
num_proc and cache, and with source paths replaced by their files' content hashes, so moving the data keeps
it), the seed, the tokenizer (vocabulary and pipeline, special tokens, chat template, BOS behaviour) and
``PIPELINE_VERSION``. It keys the cache and lets resume refuse a changed dataset.

Entries are written into a temporary folder beside the final one and renamed into place, so a crash or two
concurrent runs never leave a half-written entry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from neftune_cli.data.report import Report
from neftune_cli.data.sources import Source
from neftune_cli.data.tokenize import Encoder
from neftune_cli.io import faults
from neftune_cli.io.atomic import atomic_dir, clean_stale
from neftune_cli.io.cache_dir import cache_root
from neftune_cli.io.errors import first_line
from neftune_cli.recipe.load import stable_hash
from neftune_cli.recipe.schema import DataSection

# Bump when tokenization, masking or the report format changes: old entries then stop matching.
PIPELINE_VERSION = 2
REPORT = "report.json"


def tokenizer_identity(encoder: Encoder) -> str:
    tokenizer = encoder.tokenizer
    return stable_hash(
        {
            "backend": stable_hash(tokenizer.backend_tokenizer.to_str()),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "chat_template": tokenizer.chat_template,
            "adds_bos": encoder.adds_bos,
            "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        }
    )


def fingerprint(data: DataSection, train: list[Source], held: list[Source], tokenizer_id: str, seed: int) -> str:
    # on_bad_record is left out: it decides whether bad records stop the run, not which examples there are.
    section = data.model_dump(mode="json", exclude={"num_proc", "cache", "on_bad_record", "sources", "eval_sources"})
    section["sources"] = [_source_key(s) for s in train]
    section["eval_sources"] = [_source_key(s) for s in held]
    # The seed only picks the held-out examples and the weighted samples; without those it changes nothing.
    seeded = data.eval_fraction is not None or data.eval_size is not None or any(s.weight for s in data.sources)
    return stable_hash(
        {
            "version": PIPELINE_VERSION,
            "data": section,
            "seed": seed if seeded else None,
            "tokenizer": tokenizer_id,
        }
    )


def _source_key(source: Source) -> dict:
    spec = source.spec.model_dump(mode="json", exclude={"path"})
    return {**spec, "content": source.identity()}


def entry(fp: str) -> Path:
    return cache_root() / "data" / fp


def load(fp: str, log: Callable[[str], None]):
    """(train, eval, report) from a complete cache entry, or None. A damaged entry (disk trouble, a hand edit)
    is ours to delete: it is removed, so the caller tokenizes again and writes a new one."""
    import datasets

    folder = entry(fp)
    if not (folder / REPORT).is_file():
        return None
    try:
        report = Report.from_dict(json.loads((folder / REPORT).read_text(encoding="utf-8")))
        train = datasets.load_from_disk(str(folder / "train"))
        held = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
        for split in (train, held):
            if split is not None:
                split.data.validate(full=True)  # memory-mapped arrow: reading it all is cheap and finds damage
    except Exception as e:  # noqa: BLE001 - json, arrow and datasets raise many types for damaged files
        log(f"data: warning: the cache entry {folder} is damaged ({first_line(e)}); tokenizing again")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return train, held, report


def save(fp: str, train, held, report: Report) -> Path:
    """Write an entry atomically; returns its folder (an existing complete entry is kept as it is)."""
    final = entry(fp)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    with atomic_dir(final, is_complete=lambda folder: (folder / REPORT).is_file()) as tmp:
        train.save_to_disk(str(tmp / "train"))
        faults.checkpoint("cache-write")
        if held is not None:
            held.save_to_disk(str(tmp / "eval"))
        # Last: the report marks the entry complete.
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    return final


