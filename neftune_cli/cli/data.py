"""``neftune data``: preview, stats and export of a recipe's tokenized data; clean for the raw records.
Errors are raised, not printed: the top-level ``neftune`` entry point turns them into one line and an exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from neftune_cli.data import preview as show
from neftune_cli.data.report import histogram, padding_waste, percentiles
from neftune_cli.io import console
from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.errors import UsageError
from neftune_cli.io.outputs import check_output_file

app = typer.Typer(help="Inspect how a recipe's data is tokenized and masked.", no_args_is_help=True)

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. data.max_seq_len=1024. Repeatable."
)


def _load(recipe: Path, overrides: list[str] | None):
    from neftune_cli.recipe.load import load_recipe

    loaded = load_recipe(recipe, overrides)
    for warning in loaded.warnings():
        console.log(f"warning: {warning}")
    return loaded


def _prepare(loaded):
    from neftune_cli.data.pipeline import prepare
    from neftune_cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(loaded.recipe.model)
    return loaded.recipe, tokenizer, prepare(loaded.recipe, tokenizer, log=console.log)


@app.command()
def preview(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    n: int = typer.Option(3, "-n", min=1, help="How many examples, from the start of the training set."),
    index: int = typer.Option(None, "--index", min=0, help="Show only this training example."),
) -> None:
    """Print examples as the model sees them, with the trained tokens marked, and their token counts.

    Example: neftune data preview recipes/demo.yaml -n 2
    """
    _, tokenizer, data = _prepare(_load(recipe, set_))
    if index is not None and index >= len(data.train):
        raise UsageError(f"--index {index}: the training set has {len(data.train)} examples")
    chosen = [index] if index is not None else list(range(min(n, len(data.train))))
    tty = console.stdout_is_tty()
    console.out.print(show.LEGEND_RICH if tty else show.LEGEND_PLAIN, markup=tty)
    for i in chosen:
        example = data.train[i]
        ids, labels = example["input_ids"], example["labels"]
        console.out.print(show.header(i, ids, labels), markup=False)
        parts = show.segments(ids, labels, tokenizer)
        if tty:
            console.out.print(show.rich(parts))
        else:
            console.out.print(show.plain(parts), markup=False)


@app.command()
def stats(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """Counts per source, what was dropped / truncated / skipped and why, token lengths, padding waste.

    Example: neftune data stats recipes/llama2-alpaca.yaml --json
    """
    spec, _, data = _prepare(_load(recipe, set_))
    lengths = np.asarray(data.train["length"])
    batch = spec.train.micro_batch_size
    result = {
        "report": data.report.to_dict(),
        "fingerprint": data.fingerprint,
        "train_length_percentiles": percentiles(lengths),
        "train_length_histogram": histogram(lengths),
        "padding_waste": {
            "micro_batch_size": batch,
            "pad_to_longest_random_batches": round(padding_waste(lengths, batch, spec.train.seed), 4),
            "packing": 0.0,  # padding-free rows: every computed position is a real token
        },
    }
    if as_json:
        console.out.print(json.dumps(result, indent=1), markup=False, highlight=False)
        return
    for line in _stats_lines(data.report, result):
        console.out.print(line, markup=False)


def _stats_lines(report, result: dict) -> list[str]:
    lines = []
    for title, sources in (("sources", report.sources), ("eval sources", report.eval_sources)):
        if sources:
            lines.append(f"{title}:")
        for s in sources:
            weight = f" (weight {s.weight:g})" if s.weight is not None else ""
            lines.append(
                f"  {s.path} [{s.format}]: {s.records:,} records, {s.bad:,} bad, {s.dropped_overlength:,} dropped "
                f"over max_seq_len, {s.dropped_untrained:,} dropped with nothing trained, {s.truncated:,} truncated, "
                f"{s.splits:,} conversation splits; "
                f"{s.examples:,} examples, {s.held_out:,} held out for eval, {s.used:,} used{weight}"
            )
    if report.bad:
        lines.append(f"bad records skipped: {report.bad:,}; the first {len(report.bad_reasons)}:")
        lines += [f"  {reason}" for reason in report.bad_reasons]
    for name, split in (("train", report.train), ("eval", report.eval)):
        if split is not None:
            lines.append(
                f"{name}: {split.examples:,} examples, {split.tokens:,} tokens, "
                f"{split.trained_tokens:,} trained ({split.trained_fraction:.1%})"
            )
    lines.append(f"end of turn (trained, generation stops on it): {report.end_of_turn!r}")
    lines.append(
        "train lengths: "
        + ", ".join(f"{k} {v}" for k, v in result["train_length_percentiles"].items())
        + f", mean {report.train.length_mean:.1f}"
    )
    bins = result["train_length_histogram"]
    top = max((b["count"] for b in bins), default=0) or 1
    for b in bins:
        bar = "#" * round(40 * b["count"] / top)
        lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>8,} {bar}")
    waste = result["padding_waste"]
    lines.append(
        f"padding waste at micro_batch_size {waste['micro_batch_size']}: pad to longest (random batches) "
        f"{waste['pad_to_longest_random_batches']:.1%}, packing {waste['packing']:.1%}"
    )
    return lines


@app.command()
def export(
    recipe: Path = RecipeArg,
    out: Path = typer.Argument(..., help="Output .jsonl file.", show_default=False),
    set_: list[str] = SetOpt,
    split: str = typer.Option("train", "--split", help="train or eval."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (never the recipe or data)."),
) -> None:
    """Write one JSON object per example, {input_ids, labels} (-100: not trained), in dataset order.

    Example: neftune data export recipes/demo.yaml tokens.jsonl
    """
    if split not in ("train", "eval"):
        raise UsageError(f"--split {split}: expected train or eval")
    loaded = _load(recipe, set_)
    _check_export_target(out, loaded, overwrite)
    _, _, data = _prepare(loaded)
    dataset = data.train if split == "train" else data.eval
    if dataset is None:
        raise UsageError("--split eval: the recipe has no eval data (data.eval_sources, eval_fraction or eval_size)")
    with atomic_file(out) as f:
        for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
                f.write(json.dumps({"input_ids": ids, "labels": labels}, separators=(",", ":")) + "\n")
    console.out.print(f"wrote {len(dataset):,} {split} examples to {out}", markup=False)


def _check_export_target(out: Path, loaded, overwrite: bool) -> None:
    """OUT must be a file path that holds nothing of the user's we would destroy."""
    from neftune_cli.data.sources import Source

    inputs = [loaded.path] + [f for spec in loaded.recipe.data.sources + loaded.recipe.data.eval_sources
                              if (source := Source(spec)).local for f in source.files]
    check_output_file(out, overwrite=overwrite, inputs=inputs, flag="OUT")


def _names(values: list[str] | None, option: str) -> set[str]:
    from neftune_cli.data.filters import FILTERS

    names = {n.strip() for v in values or [] for n in v.split(",") if n.strip()}
    if unknown := sorted(names - set(FILTERS) - {"bad"}):
        raise UsageError(f"{option} {','.join(unknown)}: unknown filter; expected {', '.join(list(FILTERS)[1:])}")
    return names


def _words(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if text is None else tuple(w.strip() for w in text.split(",") if w.strip())


@app.command()
def clean(
    source: str = typer.Argument(..., help="Data file, folder or hub dataset; or a recipe (.yaml) to clean each of "
                                 "its training sources.", show_default=False),
    out: Path = typer.Option(None, "--out", help="Cleaned file (a folder for a folder or a recipe), same format."),
    report_path: Path = typer.Option(None, "--report", help="Write the report (JSON) here."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write only the report; --out is not needed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (never an input)."),
    fmt: str = typer.Option("auto", "--format", help="auto|alpaca|sharegpt|messages (not for a recipe)."),
    fields: list[str] = typer.Option(None, "--field", metavar="OURS=THEIRS",
                                     help="Column rename, e.g. output=answer (not for a recipe). Repeatable."),
    without: list[str] = typer.Option(None, "--without", help="Turn filters off, e.g. near_dup,punctuation."),
    with_: list[str] = typer.Option(None, "--with", help="Turn filters on, e.g. non_english."),
    rouge_l: float = typer.Option(0.7, "--rouge-l", min=0.01, max=1.0,
                                  help="near_dup: ROUGE-L F at or above which an instruction is a near-duplicate."),
    min_words: int = typer.Option(4, "--min-words", min=0, help="length: fewest words in an instruction."),
    max_words: int = typer.Option(150, "--max-words", min=1, help="length: most words in an instruction."),
    max_output_words: int = typer.Option(None, "--max-output-words", min=1, help="length: most words in an output."),
    blocklist: str = typer.Option(None, "--blocklist", help="blocklist: comma-separated words/phrases, replacing "
                                  "Alpaca's (image, graph, picture, file, map, draw, plot, go to, video, ...)."),
    placeholders: str = typer.Option(None, "--placeholders", help="empty: comma-separated output starts that mean "
                                     "no output (default <nooutput>, <no output>, <noinput>, <no input>)."),
    max_non_ascii: float = typer.Option(0.5, "--max-non-ascii", min=0.0, max=1.0,
                                        help="non_english: largest share of non-ASCII letters in an instruction."),
    on_bad_record: str = typer.Option("error", "--on-bad-record", help="error (exit 2) or skip (remove, count)."),
) -> None:
    """Remove duplicates, near-duplicate instructions (ROUGE-L), empty or placeholder outputs and instructions
    a text model cannot use; write the rest unchanged, in order, in the input's format; report what went and why.

    Example: neftune data clean alpaca_data.json --out alpaca_clean.json --report clean_report.json
    """
    from neftune_cli.data import clean as cleaning
    from neftune_cli.data import clean_summary
    from neftune_cli.data.filters import BLOCKLIST, DEFAULT_OFF, FILTERS, PLACEHOLDERS, Rules
    from neftune_cli.recipe.schema import SourceSection

    if on_bad_record not in ("error", "skip"):
        raise UsageError(f"--on-bad-record {on_bad_record}: expected error or skip")
    if fmt not in ("auto", "alpaca", "sharegpt", "messages"):
        raise UsageError(f"--format {fmt}: expected auto, alpaca, sharegpt or messages")
    if out is None and not dry_run:
        raise UsageError("--out is required (or --dry-run to write only the report)")
    if min_words > max_words:
        raise UsageError(f"--min-words {min_words} is above --max-words {max_words}")
    renames = dict(f.split("=", 1) for f in fields or [] if "=" in f)
    if len(renames) < len(fields or []):
        raise UsageError("--field: expected OURS=THEIRS, e.g. output=answer")
    if unknown := sorted(set(renames) - set(SourceSection.FIELD_NAMES)):
        raise UsageError(f"--field {unknown[0]}=...: unknown field; ours are {', '.join(SourceSection.FIELD_NAMES)}")
    rules = Rules(
        enabled=frozenset((set(FILTERS) - DEFAULT_OFF - _names(without, "--without")) | _names(with_, "--with")),
        min_words=min_words, max_words=max_words, max_output_words=max_output_words,
        blocklist=_words(blocklist, BLOCKLIST), placeholders=_words(placeholders, PLACEHOLDERS),
        max_non_ascii=max_non_ascii,
    )
    target = None if dry_run else out
    recipe_form = Path(source).suffix.lower() in (".yaml", ".yml")
    if recipe_form:
        from neftune_cli.recipe.load import load_recipe

        if fmt != "auto" or renames:
            raise UsageError("--format and --field are for a data file; a recipe's sources carry their own")
        if out is not None and out.suffix.lower() in cleaning.EXTENSIONS:
            raise UsageError(f"--out {out}: a recipe's sources are cleaned into a folder")
        units, targets = cleaning.plan_recipe(load_recipe(source).recipe.data.sources, target, overwrite=overwrite)
    else:
        units = cleaning.plan_path(source, target, fmt=fmt, fields=renames or None, overwrite=overwrite)
    if report_path is not None:
        cleaning.check_report_path(report_path, units, overwrite=overwrite)
    with clean_summary.Phases() as progress:
        result = cleaning.clean(units, rules, rouge_l=rouge_l, skip_bad=on_bad_record == "skip", progress=progress)
    cleaning.write(result)
    summary = cleaning.report(result, rules, rouge_l=rouge_l)
    if report_path is not None:
        with atomic_file(report_path) as f:
            json.dump(summary, f, ensure_ascii=False, indent=1)
            f.write("\n")
    clean_summary.show(summary)
    if recipe_form and not dry_run:
        console.out.print("train on the cleaned data with:", markup=False)
        for k, path in enumerate(targets):
            console.out.print(f"  --set data.sources.{k}.path={path.resolve()}", markup=False)
