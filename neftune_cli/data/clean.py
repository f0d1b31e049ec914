"""``neftune data clean``: remove the records Self-Instruct would not keep, write the rest unchanged.

plan (which files, where each goes, refusing to write over an input or, without --overwrite, any file) ->
read (sources.Source, formats.detect/parse: the readers, detection and renames training uses) -> per-record rules
(filters) -> exact duplicates -> near-duplicate instructions (rouge) -> write the kept records' original values,
in their order, in the input's format -> report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neftune_cli.data.filters import FILTERS, Rules, View
from neftune_cli.data.formats import BadRecord, EmptyText, Fields, OneSided, detect, parse
from neftune_cli.data.rouge import near_duplicates
from neftune_cli.data.sources import EXTENSIONS, Source, looks_like_path
from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.errors import DataError, UsageError
from neftune_cli.io.outputs import check_output_file
from neftune_cli.recipe.schema import SourceSection

EXAMPLES = 5  # examples per filter in the report
SHOWN_CHARS = 200  # of a record's text in an example

Progress = Callable[[str, int, int | None], None]  # (phase, done, total or None)


@dataclass
class Unit:
    """One input file (or hub split) and the file its kept records go to."""

    spec: SourceSection  # path: this one file; format/fields: its source's
    source: int  # index of its source: format detection is per source, as in training
    out: Path | None  # None: --dry-run


@dataclass
class Item:
    unit: int
    where: str
    value: Any
    view: View | None = None
    removed: str | None = None  # the filter that removed it
    reason: str = ""
    duplicate_of: int | None = None  # index into the items, for exact_dup / near_dup
    score: float | None = None


@dataclass
class Result:
    units: list[Unit]
    items: list[Item]
    skip_bad: bool
    formats: dict[int, str] = field(default_factory=dict)  # source index -> detected or given format

    def kept(self, unit: int) -> list[Item]:
        return [item for item in self.items if item.unit == unit and item.removed is None]


def plan_path(path: str, out: Path | None, *, fmt: str, fields: dict[str, str] | None, overwrite: bool) -> list[Unit]:
    """IN is a file (OUT a file), a folder (OUT a folder, same layout) or a hub dataset (OUT a file)."""
    spec = SourceSection(path=path, format=fmt, fields=fields)
    source = Source(spec)
    if not source.local and looks_like_path(path):
        raise UsageError(f"{path}: file not found")
    if not source.local:
        return _checked([Unit(spec, 0, out)], [], overwrite)
    root = Path(path)
    files = source.files  # raises for an unsupported file or an empty folder
    if out is not None and root.is_dir() and out.suffix.lower() in EXTENSIONS:
        raise UsageError(f"--out {out}: {root} is a folder, so --out must be a folder too")
    units = [Unit(spec.model_copy(update={"path": str(f)}), 0,
                  None if out is None else (out / f.relative_to(root) if root.is_dir() else out)) for f in files]
    return _checked(units, files, overwrite)


def plan_recipe(specs: list[SourceSection], out_dir: Path | None, *, overwrite: bool) -> tuple[list[Unit], list[Path]]:
    """Each of a recipe's training sources into out_dir: (units, the path each source's cleaned data has)."""
    names = [Path(s.path).name if Source(s).local else s.path.replace("/", "__") + ".jsonl" for s in specs]
    clash = len(set(names)) < len(names)
    units: list[Unit] = []
    inputs: list[Path] = []
    targets: list[Path] = []
    for k, (spec, name) in enumerate(zip(specs, names, strict=True)):
        spec = spec.model_copy(update={"max_samples": None})  # the cleaned file replaces the whole source
        target = (out_dir or Path(".")) / (f"{k}-{name}" if clash else name)
        targets.append(target)
        source = Source(spec)
        if not source.local:
            units.append(Unit(spec, k, None if out_dir is None else target))
            continue
        root = Path(spec.path)
        for f in source.files:
            inputs.append(f)
            dest = target / f.relative_to(root) if root.is_dir() else target
            units.append(Unit(spec.model_copy(update={"path": str(f)}), k, None if out_dir is None else dest))
    return _checked(units, inputs, overwrite), targets


def check_report_path(report: Path, units: list[Unit], *, overwrite: bool) -> None:
    """Neither an input nor one of the cleaned files (a report over the cleaned data would replace it)."""
    outs = [u.out for u in units if u.out is not None]
    check_output_file(report, overwrite=overwrite, inputs=[Path(u.spec.path) for u in units] + outs, flag="--report")


def _checked(units: list[Unit], inputs: list[Path], overwrite: bool) -> list[Unit]:
    for unit in units:
        if unit.out is None:
            continue
        if unit.out.suffix.lower() not in EXTENSIONS:
            raise UsageError(f"--out {unit.out}: unsupported file type; expected one of {', '.join(EXTENSIONS)}")
        check_output_file(unit.out, overwrite=overwrite, inputs=inputs)
    outs = [u.out.resolve() for u in units if u.out is not None]
    if len(set(outs)) < len(outs):
        raise UsageError("--out: two inputs would be written to the same file")
    return units


def clean(units: list[Unit], rules: Rules, *, rouge_l: float, skip_bad: bool,
          progress: Progress | None = None) -> Result:
    """Read every unit, decide each record's fate; nothing is written."""
    result = Result(units, _read(units, rules, skip_bad, progress), skip_bad)
    for unit in units:
        result.formats.setdefault(unit.source, unit.spec.format)
    for item in result.items:
        if _undecided(item) and (found := rules.problem(item.view)):
            item.removed, item.reason = found
    if "exact_dup" in rules.enabled:
        _exact_duplicates(result.items)
    if "near_dup" in rules.enabled:
        _near_duplicates(result.items, rouge_l, progress)
    return result


def _undecided(item: Item) -> bool:
    """Not removed, and parsed: an empty record kept because its filter is off is not compared with others."""
    return item.removed is None and item.view is not None


def _read(units: list[Unit], rules: Rules, skip_bad: bool, progress: Progress | None) -> list[Item]:
    items: list[Item] = []
    detected: dict[int, tuple[str, Fields]] = {}
    for u, unit in enumerate(units):
        fmt, fields = detected.get(unit.source, (unit.spec.format, Fields(unit.spec.fields)))
        for raw in Source(unit.spec).records():
            item = Item(u, raw.where, raw.value)
            try:
                if raw.problem is not None:
                    raise BadRecord(None, raw.problem)
                if fmt == "auto":
                    fmt, renames, _ = detect(raw.value, fields)
                    fields = Fields({**fields.renames, **renames})
                item.view = View.of(parse(raw.value, fmt, fields))
            except (EmptyText, OneSided) as e:
                name = "empty" if isinstance(e, EmptyText) else "one_sided"
                if name in rules.enabled:  # otherwise kept as it is, and left out of the other filters
                    item.removed, item.reason = name, str(e)
            except BadRecord as e:
                if not skip_bad:
                    hint = "--on-bad-record skip removes bad records and counts them"
                    raise DataError(f"{raw.where}: {e} ({hint})") from None
                item.removed, item.reason = "bad", str(e)
            items.append(item)
            if progress is not None and len(items) % 4096 == 0:
                progress("read", len(items), None)
        detected[unit.source] = (fmt, fields)
        unit.spec = unit.spec.model_copy(update={"format": fmt, "fields": fields.renames or None})
    if progress is not None:
        progress("read", len(items), len(items))
    return items


def _exact_duplicates(items: list[Item]) -> None:
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        if not _undecided(item):
            continue
        j = first.setdefault(item.view.key, i)
        if j != i:
            item.removed, item.reason, item.duplicate_of = "exact_dup", "same record as an earlier one", j


def _near_duplicates(items: list[Item], threshold: float, progress: Progress | None) -> None:
    texts = [item.view.instruction if _undecided(item) else None for item in items]
    tick = (lambda phase, done: progress(f"near_dup {phase}", done, len(texts))) if progress is not None else None
    for i, (j, score) in near_duplicates(texts, threshold, tick).items():
        items[i].removed, items[i].duplicate_of, items[i].score = "near_dup", j, score
        items[i].reason = f"ROUGE-L {score:.3f} with an earlier kept instruction"


def write(result: Result) -> None:
    """Each unit's kept records, values unchanged and in order, to its out file (whole or not at all)."""
    for u, unit in enumerate(result.units):
        if unit.out is None:
            continue
        kept = result.kept(u)
        suffix = unit.out.suffix.lower()
        if suffix == ".parquet":
            _write_parquet(unit, kept, [i for i, item in enumerate(_unit_items(result, u)) if item.removed is None])
            continue
        values = [item.value for item in kept]
        with atomic_file(unit.out) as f:
            if suffix == ".jsonl":
                f.writelines(json.dumps(v, ensure_ascii=False) + "\n" for v in values)
            elif suffix == ".json":
                json.dump(values, f, ensure_ascii=False, indent=2)
                f.write("\n")
            else:
                _write_csv(f, values)


def _unit_items(result: Result, unit: int) -> list[Item]:
    return [item for item in result.items if item.unit == unit]


def _write_parquet(unit: Unit, kept: list[Item], positions: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = Path(unit.spec.path)
    # From parquet, take the rows themselves: the schema and every value's type stay exactly as they were.
    if source.suffix.lower() == ".parquet" and source.is_file():
        table = pq.read_table(source).take(positions)
    else:
        table = pa.Table.from_pylist([item.value for item in kept])
    with atomic_file(unit.out, binary=True) as f:
        pq.write_table(table, f)


def _write_csv(f, values: list[dict]) -> None:
    import csv

    columns = list(dict.fromkeys(key for value in values for key in value))
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(values)


def report(result: Result, rules: Rules, *, rouge_l: float) -> dict:
    """Counts per filter with a few examples each (near/exact duplicates with the kept record), kept counts."""
    items = result.items
    filters = {}
    for name, description in FILTERS.items():
        removed = [item for item in items if item.removed == name]
        if not (result.skip_bad if name == "bad" else name in rules.enabled):
            filters[name] = {"enabled": False, "removes": description, "removed": 0, "examples": []}
            continue
        filters[name] = {"enabled": True, "removes": description, "removed": len(removed),
                         "examples": [_example(item, items) for item in removed[:EXAMPLES]]}
    filters["near_dup"]["threshold"] = rouge_l
    inputs = []
    for u, unit in enumerate(result.units):
        unit_items = _unit_items(result, u)
        inputs.append({"path": unit.spec.path, "format": result.formats.get(unit.source, unit.spec.format),
                       "out": None if unit.out is None else str(unit.out), "records": len(unit_items),
                       "kept": sum(item.removed is None for item in unit_items)})
    kept = sum(item.removed is None for item in items)
    return {"records": len(items), "kept": kept, "removed": len(items) - kept, "inputs": inputs,
            "filters": filters, "rules": _rules_dict(rules)}


def _example(item: Item, items: list[Item]) -> dict:
    example = {"where": item.where, "reason": item.reason, "instruction": _shown(item)}
    if item.duplicate_of is not None:
        kept = items[item.duplicate_of]
        example["duplicate_of"] = {"where": kept.where, "instruction": _shown(kept)}
        if item.score is not None:
            example["rouge_l"] = round(item.score, 4)
    return example


def _shown(item: Item) -> str | None:
    if item.view is None:
        return None
    text = item.view.instruction
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _rules_dict(rules: Rules) -> dict:
    return {"enabled": sorted(rules.enabled), "min_words": rules.min_words, "max_words": rules.max_words,
            "max_output_words": rules.max_output_words, "blocklist": list(rules.blocklist),
            "placeholders": list(rules.placeholders), "max_non_ascii": rules.max_non_ascii}
