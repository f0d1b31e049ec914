"""The per-record rules of ``neftune data clean``, after Self-Instruct (Wang et al. 2022) and Stanford Alpaca's
``generate_instruction.py``: what a record's instruction and outputs are, and whether one rule removes it.

A conversation's instruction is its first user turn and its outputs are its trained assistant turns, so the same
rules apply to Alpaca records and conversations. Duplicates are found in ``clean`` (they need every record).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cached_property

from neftune_cli.data.formats import Record, is_conversation

# name -> what it removes, in the order they are tried (a record is reported under the first that removes it)
FILTERS = {
    "bad": "records that cannot be read (only with --on-bad-record skip)",
    "empty": "an empty instruction, output, turn or conversation, or a <nooutput>-style placeholder output",
    "one_sided": "conversations without a user turn or without an assistant turn",
    "length": "instructions outside --min-words/--max-words words, outputs over --max-output-words",
    "blocklist": "instructions naming what a text model cannot use (--blocklist)",
    "punctuation": "instructions starting with punctuation",
    "non_english": "instructions whose letters are mostly non-ASCII (--max-non-ascii; off by default)",
    "exact_dup": "the same record again (case and whitespace ignored)",
    "near_dup": "instructions with ROUGE-L F >= --rouge-l against an earlier kept one",
}
DEFAULT_OFF = frozenset({"non_english"})
# Stanford Alpaca's list (Self-Instruct's plus video ... diagram), matched as whole words, case-insensitively.
BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# Outputs starting with these (case-insensitively) are placeholders, e.g. Alpaca's "<nooutput> This type of
# instruction cannot be fulfilled by a GPT model."
PLACEHOLDERS = ("<nooutput>", "<no output>", "<noinput>", "<no input>")


@dataclass(frozen=True)
class Rules:
    """Thresholds of the per-record filters; the CLI's flags."""

    enabled: frozenset[str] = frozenset(FILTERS) - DEFAULT_OFF
    min_words: int = 4  # Self-Instruct drops instructions of 3 words or fewer ...
    max_words: int = 150  # ... and over 150
    max_output_words: int | None = None
    blocklist: tuple[str, ...] = BLOCKLIST
    placeholders: tuple[str, ...] = PLACEHOLDERS
    max_non_ascii: float = 0.5

    @cached_property
    def _blocked(self) -> re.Pattern | None:
        words = [w.strip() for w in self.blocklist if w.strip()]
        return re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else None

    def problem(self, view: View) -> tuple[str, str] | None:
        """(filter, reason) of the first enabled rule that removes the record, or None."""
        for name, check in (("empty", self._empty), ("one_sided", _one_sided), ("length", self._length),
                            ("blocklist", self._blocklist), ("punctuation", _punctuation),
                            ("non_english", self._non_english)):
            if name in self.enabled and (reason := check(view)):
                return name, reason
        return None

    def _empty(self, view: View) -> str | None:
        for text in view.outputs:
            start = text.strip().lower()
            for placeholder in self.placeholders:
                if start.startswith(placeholder.lower()):
                    return f"placeholder output {placeholder!r}"
        return None

    def _length(self, view: View) -> str | None:
        words = len(view.instruction.split())
        if words < self.min_words:
            return f"instruction of {words} words (< {self.min_words})"
        if words > self.max_words:
            return f"instruction of {words} words (> {self.max_words})"
        if self.max_output_words is not None:
            longest = max((len(t.split()) for t in view.outputs), default=0)
            if longest > self.max_output_words:
                return f"output of {longest} words (> {self.max_output_words})"
        return None

    def _blocklist(self, view: View) -> str | None:
        found = self._blocked.search(view.instruction) if self._blocked else None
        return f"instruction mentions {found.group(0)!r}" if found else None

    def _non_english(self, view: View) -> str | None:
        letters = [c for c in view.instruction if c.isalpha()]
        share = sum(not c.isascii() for c in letters) / len(letters) if letters else 0.0
        return f"{share:.0%} of the instruction's letters are not ASCII" if share > self.max_non_ascii else None


@dataclass(frozen=True)
class View:
    """What the rules look at in one parsed record."""

    instruction: str  # Alpaca's instruction, a conversation's first user turn ("" when it has none)
    outputs: tuple[str, ...]  # Alpaca's output, a conversation's trained assistant turns
    key: str  # the whole record, normalised: equal keys are exact duplicates
    conversation: bool

    @classmethod
    def of(cls, record: Record) -> View:
        if is_conversation(record):
            messages = record["messages"]
            users = [m["content"] for m in messages if m["role"] == "user"]
            outputs = tuple(m["content"] for m, trained in zip(messages, record["trained"], strict=True) if trained)
            key = "\n".join(f"{m['role']}: {normalise(m['content'])}" for m in messages)
            return cls(users[0] if users else "", outputs, key, conversation=True)
        parts = (record["system"] or "", record["instruction"], record["input"], record["output"])
        return cls(record["instruction"], (record["output"],), "\n".join(map(normalise, parts)), conversation=False)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _one_sided(view: View) -> str | None:
    # parse() already refuses a conversation with no assistant turn (formats.OneSided); this is the other side
    return "no user turn" if view.conversation and not view.instruction.strip() else None


def _punctuation(view: View) -> str | None:
    text = view.instruction.lstrip()
    return f"instruction starts with {text[0]!r}" if text and text[0] in string.punctuation else None
