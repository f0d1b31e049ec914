"""Show an example's text with its trained tokens marked: rich colour on a terminal, ``[[...]]`` otherwise."""

from __future__ import annotations

from rich.text import Text

from neftune_cli.data.tokenize import IGNORE

OPEN, CLOSE = "[[", "]]"
LEGEND_PLAIN = f"legend: {OPEN}text{CLOSE} is trained (labels = tokens); everything else is context (labels -100)"
LEGEND_RICH = "legend: [bold green]green[/] is trained (labels = tokens); dim is context (labels -100)"


def segments(input_ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """The example's text cut into runs of trained / untrained tokens.

    Each run is decoded as the difference between decoding everything up to its end and up to its start, so
    the text reads as the whole example does (decoding a run alone can drop or add the leading space).
    """
    runs: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels):
        trained = label != IGNORE
        if runs and runs[-1][2] == trained:
            runs[-1] = (runs[-1][0], i + 1, trained)
        else:
            runs.append((i, i + 1, trained))
    out, before = [], ""
    for start, end, trained in runs:
        upto = tokenizer.decode(input_ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if upto.startswith(before):
            piece = upto[len(before) :]
        else:  # a multi-byte character split across runs: fall back to decoding the run alone
            piece = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        out.append((piece, trained))
        before = upto
    return out


def plain(parts: list[tuple[str, bool]]) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for text, trained in parts)


def rich(parts: list[tuple[str, bool]]) -> Text:
    text = Text()
    for piece, trained in parts:
        text.append(piece, style="bold green" if trained else "dim")
    return text


def header(index: int, input_ids: list[int], labels: list[int]) -> str:
    trained = sum(label != IGNORE for label in labels)
    share = trained / len(input_ids) if input_ids else 0.0
    return f"--- example {index}: {len(input_ids)} tokens, {trained} trained ({share:.0%})"
