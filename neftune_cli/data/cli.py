"""``neftune data``: preview, stats and export of a recipe's tokenized data. Errors are raised, not printed:
the top-level ``neftune`` entry point turns them into one line and an exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from neftune_cli import console
from neftune_cli.atomic import atomic_file
from neftune_cli.data import preview as show
from neftune_cli.data.report import histogram, padding_waste, percentiles
from neftune_cli.errors import UsageError

app = typer.Typer(help="Inspect how a recipe's data is tokenized and masked.", no_args_is_help=True)

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. data.max_seq_len=1024. Repeatable."
)


def _load(recipe: Path, overrides: list[str] | None):
    from neftune_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    for warning in loaded.warnings():
        console.log(f"warning: {warning}")
    return loaded


def _prepare(recipe: Path, overrides: list[str] | None, loaded=None):
    from neftune_cli.data import prepare
    from neftune_cli.modeling import load_tokenizer

    loaded = loaded or _load(recipe, overrides)
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
    _, tokenizer, data = _prepare(recipe, set_)
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
    spec, _, data = _prepare(recipe, set_)
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
    _, _, data = _prepare(recipe, set_, loaded)
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

    if out.is_dir():
        raise UsageError(f"{out} is a folder; give the path of the .jsonl file to write")
    if not out.exists():
        return
    inputs = [loaded.path] + [f for spec in loaded.recipe.data.sources + loaded.recipe.data.eval_sources
                              if (source := Source(spec)).local for f in source.files]
    for path in inputs:
        if out.samefile(path):
            raise UsageError(f"{out} is an input of the recipe ({path}); export to another file")
    if not overwrite:
        raise UsageError(f"{out} exists; add --overwrite to replace it")
