"""Tokenize rendered examples and label the trained tokens, exactly as serving will see them.

The rule (what ``apply_chat_template(..., tokenize=True)``, vLLM and llama.cpp do at serving time):

- Text is tokenized with ``add_special_tokens=False``: the rendered text alone decides the tokens, BOS included.
  A chat template that writes no ``{{ bos_token }}`` gets no BOS (``prepare`` warns when the tokenizer would add
  one by default); the Alpaca template writes BOS itself when the tokenizer adds one (see templates).
- Each prompt is tokenized alone, as serving tokenizes it; the model then generates the reply's tokens. So an
  example is built turn by turn: the tokens of the prompt before each trained reply, then the reply's tokens.
  Normally the reply's tokens are those of the whole text, and the example is the text's tokenization. Where a
  token merges across a prompt/reply boundary (a prompt ending in plain text that the reply continues), the
  prompt keeps its own tokens and the reply is tokenized as a continuation (no start-of-text space), which is
  what generation produces after that prompt.
- A later prompt re-tokenizes the earlier turns from text. When that gives other tokens than the earlier prompt
  + generated reply (the boundary merge above, or a reply whose end merges with the template text after it), one
  sequence cannot be both, so the conversation is split there: the next example starts from the later prompt's
  own tokens. Splits are counted in the data report.

Labels are not shifted: ``labels[t] == input_ids[t]`` for trained tokens, -100 elsewhere.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from neftune_cli.data.formats import BadRecord
from neftune_cli.data.templates import Rendered, Template, adds_bos
from neftune_cli.io.errors import DataError

IGNORE = -100

# Status of a row after tokenization; only OK and TRUNCATED rows are kept.
OK, TRUNCATED, OVERLENGTH, UNTRAINED, BAD = "ok", "truncated", "overlength", "untrained", "bad"


class Encoder:
    """Text -> token ids: the serving path (``ids``), the same with character offsets, and reply continuations."""

    def __init__(self, tokenizer):
        if not tokenizer.is_fast:
            raise DataError(
                "the tokenizer is not a fast tokenizer (no tokenizer.json); masks need its character offsets"
            )
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.adds_bos = adds_bos(tokenizer)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The serving path: the tokenizer's own call, as ``apply_chat_template(tokenize=True)`` makes it."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    @cached_property
    def backend(self):
        """A private copy of the Rust tokenizer: the wrapper leaves truncation/padding state on the shared one."""
        return self._copy(json.loads(self.tokenizer.backend_tokenizer.to_str()))

    @cached_property
    def continuation(self):
        """The tokenizer without its start-of-text space (SentencePiece's "▁" prefix, byte-level prefix space):
        how text that continues other text is tokenized."""
        spec = json.loads(self.tokenizer.backend_tokenizer.to_str())
        spec["normalizer"] = _without_prefix_space(spec.get("normalizer"))
        spec["pre_tokenizer"] = _without_prefix_space(spec.get("pre_tokenizer"))
        return self._copy(spec)

    def _copy(self, spec: dict):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(json.dumps(spec))
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return backend

    def ids_and_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and each token's [start, end) character offsets (the backend: about twice the wrapper's speed)."""
        return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def continuation_ids(self, text: str) -> list[int]:
        return self.continuation.encode(text, add_special_tokens=False).ids


def _without_prefix_space(component: dict | None) -> dict | None:
    """A normalizer / pre-tokenizer that no longer puts a space in front of the text."""
    if component is None or component.get("type") == "Prepend":
        return None
    kind = component.get("type")
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in component else "pretokenizers"
        parts = [p for p in map(_without_prefix_space, component[key]) if p is not None]
        return {**component, key: parts}
    if kind == "Metaspace":
        legacy = {"add_prefix_space": False} if "add_prefix_space" in component else {}  # tokenizers < 0.14
        return {**component, "prepend_scheme": "never", **legacy}
    if kind == "ByteLevel":
        return {**component, "add_prefix_space": False}
    return component


class Row(NamedTuple):
    input_ids: list[int]  # empty unless kept
    labels: list[int]
    full_length: int  # tokens before truncation
    trained: int  # tokens with a label
    status: str
    reason: str  # why a row was not kept
    where: str  # the record's place in its source
    source: int
    piece: int  # 0, or k for the k-th split-off part of a conversation


@dataclass(frozen=True)
class Tokenize:
    """The ``datasets.map`` function (batched): rows {record (JSON), where, source} -> one row per example (a split
    conversation gives several) with tokens, labels and a status."""

    template: Template
    encoder: Encoder
    max_seq_len: int
    overlength: str  # truncate | drop
    last_turn_only: bool
    train_on_inputs: bool

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rendered: list[Rendered | BadRecord] = []
        for record in batch["record"]:
            try:
                rendered.append(self.template.render(json.loads(record)))
            except BadRecord as e:
                rendered.append(e)
        good = [r for r in rendered if isinstance(r, Rendered)]
        encoded = iter(self.encoder.ids_and_offsets([r.text for r in good]))
        prompts = iter(self.encoder.ids([r.text[:start] for r in good for start, _ in self._spans(r)]))
        rows: list[Row] = []
        for r, where, source in zip(rendered, batch["where"], batch["source"], strict=True):
            if isinstance(r, BadRecord):
                rows.append(Row([], [], 0, 0, BAD, str(r), where, source, 0))
                continue
            full = next(encoded)
            expected = [next(prompts) for _ in self._spans(r)]
            try:
                pieces = self._pieces(r, full, expected)
            except BadRecord as e:
                rows.append(Row([], [], len(full[0]), 0, BAD, str(e), where, source, 0))
                continue
            rows += [self._row(ids, labels, where, source, k) for k, (ids, labels) in enumerate(pieces)]
        out = {field: [getattr(row, field) for row in rows] for field in Row._fields}
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    def _spans(self, r: Rendered) -> list[tuple[int, int]]:
        return r.spans[-1:] if self.last_turn_only else r.spans

    def _pieces(self, r: Rendered, full, prompts: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        """The examples of one rendered record: each trained reply after its prompt's own tokens (module docstring)."""
        full_ids, offsets = full
        bos = self.encoder.bos_id
        if bos is not None and full_ids[:2] == [bos, bos]:
            raise BadRecord(None, "the text starts with two BOS tokens (the chat template writes bos_token twice)")
        pieces = []
        ids: list[int] = []
        labels: list[int] = []
        for (start, end), prompt in zip(self._spans(r), prompts, strict=True):
            if prompt[: len(ids)] != ids:  # this prompt re-tokenizes the earlier turns: split here
                pieces.append((ids, labels))
                ids, labels = [], []
            new = prompt[len(ids) :]
            labels += new if self.train_on_inputs else [IGNORE] * len(new)
            reply = self._reply(r.text, full_ids, offsets, prompt, start, end)
            ids = prompt + reply
            labels += reply
        pieces.append((ids, labels))
        return pieces

    def _reply(self, text: str, full_ids, offsets, prompt: list[int], start: int, end: int) -> list[int]:
        """The reply's tokens after its prompt: the whole text's, unless a token crosses one of its edges."""
        first = len(prompt)
        stop = bisect_left(offsets, end, key=lambda o: o[0])
        if full_ids[:first] == prompt and stop > first and offsets[stop - 1][1] <= end:
            return full_ids[first:stop]
        return self.encoder.continuation_ids(text[start:end])

    def _row(self, ids: list[int], labels: list[int], where: str, source: int, piece: int) -> Row:
        full_length = len(ids)
        status = OK
        if full_length > self.max_seq_len:
            if self.overlength == "drop":
                reason = f"{full_length} tokens > max_seq_len {self.max_seq_len}"
                return Row([], [], full_length, 0, OVERLENGTH, reason, where, source, piece)
            ids, labels, status = ids[: self.max_seq_len], labels[: self.max_seq_len], TRUNCATED
        trained = len(labels) - labels.count(IGNORE)
        if not trained:
            reason = f"no trained token left within max_seq_len {self.max_seq_len}"
            return Row([], [], full_length, 0, UNTRAINED, reason, where, source, piece)
        return Row(ids, labels, full_length, trained, status, "", where, source, piece)


def features():
    """Arrow types of the ``Tokenize`` output (int32 halves the cache and memory of int64)."""
    import datasets

    ints = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        input_ids=ints,
        labels=ints,
        length=datasets.Value("int32"),
        full_length=datasets.Value("int32"),
        trained=datasets.Value("int32"),
        status=datasets.Value("string"),
        reason=datasets.Value("string"),
        where=datasets.Value("string"),
        source=datasets.Value("int32"),
        piece=datasets.Value("int32"),
    )
