"""``prepare``: a recipe's data section -> tokenized, masked train/eval datasets with a report.

read sources -> check/normalise records (formats) -> render (templates) -> tokenize, label, parity gate
(tokenize, in parallel with datasets.map) -> hold out eval, apply weights (sampling) -> cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neftune_cli.data import cache
from neftune_cli.data.formats import BadRecord, Fields, detect, parse
from neftune_cli.data.report import MAX_REASONS, Report, SourceReport, SplitReport
from neftune_cli.data.sampling import hold_out, resample
from neftune_cli.data.sources import Source
from neftune_cli.data.templates import end_of_turn, make_template, probe
from neftune_cli.data.tokenize import BAD, OVERLENGTH, TRUNCATED, UNTRAINED, Encoder, Tokenize, features
from neftune_cli.io import console
from neftune_cli.io.errors import DataError
from neftune_cli.recipe.schema import DataSection, Recipe

if TYPE_CHECKING:
    import datasets

COLUMNS = ["input_ids", "labels", "length"]
BATCH_SIZE = 1000  # records per tokenizer call


@dataclass
class PreparedData:
    train: datasets.Dataset  # COLUMNS; labels not shifted: labels[t] == input_ids[t] where trained, else -100
    eval: datasets.Dataset | None
    report: Report
    fingerprint: str  # equal iff nothing that affects the tokens changed (cache key; resume refuses a change)
    tokenizer_fingerprint: str  # the tokenizer's part of it, so resume can say which of the two changed


def prepare(
    recipe: Recipe, tokenizer, *, seed: int | None = None, log: Callable[[str], None] = console.log
) -> PreparedData:
    """Tokenize and mask the recipe's data (or load it from the cache when nothing changed)."""
    data = recipe.data
    seed = recipe.train.seed if seed is None else seed
    template = make_template(data, tokenizer)
    encoder = Encoder(tokenizer)
    train_sources = [Source(s) for s in data.sources]
    eval_sources = [Source(s) for s in data.eval_sources]
    tokenizer_fingerprint = cache.tokenizer_identity(encoder)
    fingerprint = cache.fingerprint(data, train_sources, eval_sources, tokenizer_fingerprint, seed)
    eot = end_of_turn(template)
    _warn_end_of_turn(eot, tokenizer, log)
    _warn_no_bos(template, encoder, log)
    if data.cache and (hit := cache.load(fingerprint, log)) is not None:
        train, held, report = hit
        for source, source_report in zip(
            train_sources + eval_sources, report.sources + report.eval_sources, strict=True
        ):
            source_report.path = source.name  # the same content may live elsewhere now
        log(f"data: cache hit ({cache.entry(fingerprint)})")
        if report.bad and data.on_bad_record == "error":
            _BadRecords("error").add(report.bad_reasons[0])
        return PreparedData(train, held, report, fingerprint, tokenizer_fingerprint)

    sources = train_sources + eval_sources
    reports = [SourceReport(path=s.name, weight=s.spec.weight) for s in sources]
    bad = _BadRecords(data.on_bad_record)
    rows: dict[str, list] = {"record": [], "where": [], "source": []}
    for index, source in enumerate(sources):
        _read(source, index, reports[index], rows, bad, log)
    if not rows["record"]:
        raise DataError(f"no usable training examples: {_losses(reports)}")

    started = time.perf_counter()
    mapped = _tokenize(rows, template, encoder, data, fingerprint)
    elapsed = time.perf_counter() - started
    n = len(rows["record"])
    log(f"data: tokenized {n:,} records in {elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f}/s, num_proc {data.num_proc})")

    table = mapped.data
    kept = _tally(table, reports, bad)
    n_train = len(train_sources)
    final_train, eval_idx = _split(kept, n_train, reports, train_sources, data, seed)

    lengths = table.column("length").to_numpy()
    trained = table.column("trained").to_numpy()
    report = Report(
        template=data.template,
        max_seq_len=data.max_seq_len,
        end_of_turn=eot,
        sources=reports[:n_train],
        eval_sources=reports[n_train:],
        train=SplitReport.of(lengths[final_train], trained[final_train]),
        eval=SplitReport.of(lengths[eval_idx], trained[eval_idx]) if eval_idx else None,
        bad_reasons=bad.reasons,
    )
    train = mapped.select(final_train).select_columns(COLUMNS)
    held = mapped.select(eval_idx).select_columns(COLUMNS) if eval_idx else None
    if data.cache:
        with quiet_datasets():
            cache.save(fingerprint, train, held, report)
        train, held, report = cache.load(fingerprint, log)  # memory-mapped, and identical to what a cache hit returns
    return PreparedData(train, held, report, fingerprint, tokenizer_fingerprint)


def _tally(table, reports: list[SourceReport], bad: _BadRecords) -> list[list[int]]:
    """Count each row's outcome into its source's report; the usable rows per source, in order."""
    status = table.column("status").to_pylist()
    source_of = table.column("source").to_pylist()
    pieces = table.column("piece").to_pylist()
    kept: list[list[int]] = [[] for _ in reports]
    for i, (st, source, piece) in enumerate(zip(status, source_of, pieces, strict=True)):
        report = reports[source]
        report.splits += int(piece > 0)
        if st == BAD:
            bad.add(f"{table.column('where')[i].as_py()}: {table.column('reason')[i].as_py()}")
            report.bad += 1
        elif st == OVERLENGTH:
            report.dropped_overlength += 1
        elif st == UNTRAINED:
            report.dropped_untrained += 1
        else:
            report.truncated += int(st == TRUNCATED)
            report.examples += 1
            kept[source].append(i)
    return kept


def _split(
    kept: list[list[int]],
    n_train: int,
    reports: list[SourceReport],
    train_sources: list[Source],
    data: DataSection,
    seed: int,
) -> tuple[list[int], list[int]]:
    """(train rows after weighting, eval rows): eval from data.eval_sources, or held out of the training rows."""
    if not any(kept[:n_train]):
        raise DataError(f"no usable training examples: {_losses(reports[:n_train])}")
    if data.eval_sources:
        eval_idx = [i for rows in kept[n_train:] for i in rows]
        if not eval_idx:
            raise DataError(f"no usable eval examples in data.eval_sources: {_losses(reports[n_train:])}")
        for report, rows in zip(reports[n_train:], kept[n_train:], strict=True):
            report.used = len(rows)
    else:
        _, eval_idx = hold_out([i for rows in kept[:n_train] for i in rows], data, seed)
    held = set(eval_idx)
    train_idx: list[int] = []
    for s, source in enumerate(train_sources):
        mine = [i for i in kept[s] if i not in held]
        reports[s].held_out = len(kept[s]) - len(mine)
        chosen = resample(mine, source.spec.weight, seed, str(s))
        reports[s].used = len(chosen)
        train_idx += chosen
    if not train_idx:
        raise DataError("the sources' weights leave no training examples; raise data.sources[].weight")
    return train_idx, eval_idx


def prompt_ids(prompt: dict | list, data: DataSection, tokenizer) -> list[int]:
    """The token ids inference feeds the model for a prompt: the code path the parity gate checks training by.

    prompt: a list of messages ``[{role, content}]`` ending with a user turn, or one record in any format
    (an alpaca record needs no output; a conversation's last turn must not be the assistant's).
    """
    if isinstance(prompt, list):
        prompt = {"messages": prompt}
    fields = Fields(None)
    try:
        if isinstance(prompt, dict) and fields["instruction"] in prompt:
            fmt = "alpaca"
        else:
            fmt, renames, _ = detect(prompt, fields)
            fields = Fields(renames)
        text = make_template(data, tokenizer).prompt(parse(prompt, fmt, fields, response=False))
    except BadRecord as e:
        raise DataError(f"prompt: {e}") from None
    return Encoder(tokenizer).ids([text])[0]


def stop_token_ids(data: DataSection, tokenizer) -> list[int]:
    """Token ids that end a generated response: EOS, and the template's end-of-turn token when it is one token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot_id = tokenizer.get_added_vocab().get(end_of_turn(make_template(data, tokenizer)))
    return ids + [eot_id] if eot_id is not None and eot_id not in ids else ids


class _BadRecords:
    """error: raise at the first bad record; skip: count them and keep the first few reasons."""

    def __init__(self, mode: str):
        self.mode = mode
        self.reasons: list[str] = []

    def add(self, message: str) -> None:
        if self.mode == "error":
            raise DataError(f"{message} (data.on_bad_record: skip skips bad records and counts them)")
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(message)


def _read(source: Source, index: int, report: SourceReport, rows: dict[str, list], bad: _BadRecords, log) -> None:
    fields = Fields(source.spec.fields)
    fmt = source.spec.format
    for raw in source.records():
        report.records += 1
        try:
            if raw.problem is not None:
                raise BadRecord(None, raw.problem)
            if fmt == "auto":
                fmt, renames, why = detect(raw.value, fields)
                fields = Fields({**fields.renames, **renames})
                log(f"data: {source.name}: format auto -> {fmt} ({why})")
            record = parse(raw.value, fmt, fields)
        except BadRecord as e:
            bad.add(f"{raw.where}: {e}")
            report.bad += 1
            continue
        rows["record"].append(json.dumps(record, ensure_ascii=False))
        rows["where"].append(raw.where)
        rows["source"].append(index)
    if not report.records:
        raise DataError(f"{source.name}: holds no records")
    report.format = fmt


def _tokenize(rows: dict[str, list], template, encoder: Encoder, data: DataSection, fingerprint: str):
    import datasets

    features_out = features()
    dataset = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            record=datasets.Value("string"), where=datasets.Value("string"), source=datasets.Value("int32")
        ),
    )
    fn = Tokenize(
        template=template,
        encoder=encoder,
        max_seq_len=data.max_seq_len,
        overlength=data.overlength,
        last_turn_only=data.train_on == "last_turn",
        train_on_inputs=data.train_on_inputs,
    )
    num_proc = data.num_proc if data.num_proc > 1 and len(dataset) >= 2 * data.num_proc else None
    with quiet_datasets():
        return dataset.map(
            fn,
            batched=True,
            batch_size=BATCH_SIZE,
            num_proc=num_proc,
            remove_columns=["record", "where", "source"],  # a split conversation gives several rows
            features=features_out,
            new_fingerprint=f"neftune-{fingerprint}",
        )


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No tqdm bars from datasets: they clutter logs; we log one line with the rate instead."""
    import datasets

    were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


def _losses(reports: list[SourceReport]) -> str:
    records = sum(r.records for r in reports)
    bad = sum(r.bad for r in reports)
    over = sum(r.dropped_overlength for r in reports)
    untrained = sum(r.dropped_untrained for r in reports)
    return f"{records:,} records, {bad:,} bad, {over:,} over max_seq_len (dropped), {untrained:,} with nothing trained"


def _warn_no_bos(template, encoder: Encoder, log) -> None:
    """Serving renders the template and adds nothing; training does the same, so say when that means no BOS."""
    try:
        prompt = template.prompt(probe(response=False))
    except BadRecord:
        return
    bos = encoder.tokenizer.bos_token
    if encoder.adds_bos and not prompt.startswith(bos):
        log(
            f"data: warning: the chat template writes no BOS ({bos!r}) while the tokenizer adds one by default; "
            "examples get none, as apply_chat_template gives at serving time (use a template that writes "
            "{{ bos_token }} if the model needs it)"
        )


def _warn_end_of_turn(eot: str, tokenizer, log) -> None:
    if eot and eot not in tokenizer.get_added_vocab():
        log(
            f"data: warning: responses end with {eot!r}, which is not a single special token of this tokenizer; "
            "the model learns to write it as text, so generation must stop on that string"
        )
