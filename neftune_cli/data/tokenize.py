"""Tokenize rendered examples, label the trained tokens, and check train/inference parity.

BOS: rendered text is always tokenized with ``add_special_tokens=False``; one BOS is put in front only when the
tokenizer adds BOS by default and the text does not already start with it (templates that write
``{{ bos_token }}``). So every example and every prompt starts with exactly one BOS, and the tokenizer's
post-processor never appends anything (some add EOS).

Labels are not shifted: ``labels[t] == input_ids[t]`` for trained tokens, -100 elsewhere. A token is trained when
its first character lies inside an assistant span (the response and its end-of-turn token).

Parity gate: for every assistant span, the tokens before it must equal ``Encoder.ids(prompt text)``, the exact
ids inference feeds the model (``prompt_ids``). The bulk path here reads the fast tokenizer's backend directly
(with character offsets, about twice as fast as the Python wrapper); the gate also checks it against the
wrapper on every prompt. A record that fails (a token merging across the prompt/response boundary, a template
rendering differently) is a bad record, never a silently wrong mask.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from neftune_cli.data.formats import BadRecord
from neftune_cli.data.templates import Rendered, Template
from neftune_cli.errors import DataError

IGNORE = -100

# Status of a row after tokenization; only OK and TRUNCATED rows are kept.
OK, TRUNCATED, OVERLENGTH, UNTRAINED, BAD = "ok", "truncated", "overlength", "untrained", "bad"


class Encoder:
    """Text -> token ids the way inference does it (see the module docstring for the BOS rule)."""

    def __init__(self, tokenizer):
        if not tokenizer.is_fast:
            raise DataError(
                "the tokenizer is not a fast tokenizer (no tokenizer.json); masks need its character offsets"
            )
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token or ""
        # Whether the tokenizer's post-processor puts BOS in front (Llama, Mistral: yes; GPT-2, Qwen: no).
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.adds_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    @cached_property
    def backend(self):
        """A private copy of the Rust tokenizer: the wrapper leaves truncation/padding state on the shared one."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return backend

    def needs_bos(self, text: str) -> bool:
        return self.adds_bos and not (self.bos_text and text.startswith(self.bos_text))

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The inference path: the tokenizer's own call, as ``apply_chat_template(tokenize=True)`` makes it."""
        encoded = (
            self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] if texts else []
        )
        return [[self.bos_id, *ids] if self.needs_bos(t) else ids for t, ids in zip(texts, encoded, strict=True)]

    def ids_and_starts(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids and the character offset where each token starts (BOS: 0)."""
        out = []
        for text, encoding in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False), strict=True):
            ids, starts = encoding.ids, [start for start, _ in encoding.offsets]
            if self.needs_bos(text):
                ids, starts = [self.bos_id, *ids], [0, *starts]
            out.append((ids, starts))
        return out


class Row(NamedTuple):
    input_ids: list[int]  # empty unless kept
    labels: list[int]
    full_length: int  # tokens before truncation
    trained: int  # tokens with a label
    status: str
    reason: str  # why a row was not kept


@dataclass(frozen=True)
class Tokenize:
    """The ``datasets.map`` function (batched): rows {record (JSON), where} -> tokens, labels and a status."""

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
        encoded = iter(self.encoder.ids_and_starts([r.text for r in good]))
        prompts = iter(self.encoder.ids([r.text[:start] for r in good for start, _ in r.spans]))
        rows = []
        for r in rendered:
            if isinstance(r, BadRecord):
                rows.append(Row([], [], 0, 0, BAD, str(r)))
                continue
            ids, starts = next(encoded)
            expected = [next(prompts) for _ in r.spans]
            try:
                rows.append(self._row(r, ids, starts, expected))
            except BadRecord as e:
                rows.append(Row([], [], len(ids), 0, BAD, str(e)))
        out = {field: [getattr(row, field) for row in rows] for field in Row._fields}
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    def _row(self, r: Rendered, ids: list[int], starts: list[int], expected: list[list[int]]) -> Row:
        bos = self.encoder.bos_id
        if bos is not None and ids[:2] == [bos, bos]:
            raise BadRecord(None, "the text starts with two BOS tokens (the chat template writes bos_token twice)")
        labels = list(ids) if self.train_on_inputs else [IGNORE] * len(ids)
        for k, ((start, end), prompt, name) in enumerate(zip(r.spans, expected, r.names, strict=True)):
            first, stop = bisect_left(starts, start), bisect_left(starts, end)
            if ids[:first] != prompt:
                raise BadRecord(name, _parity_reason(self.encoder.tokenizer, ids[:first], prompt))
            if not self.train_on_inputs and (not self.last_turn_only or k == len(r.spans) - 1):
                labels[first:stop] = ids[first:stop]
        full_length = len(ids)
        status = OK
        if full_length > self.max_seq_len:
            if self.overlength == "drop":
                return Row([], [], full_length, 0, OVERLENGTH, f"{full_length} tokens > max_seq_len {self.max_seq_len}")
            ids, labels, status = ids[: self.max_seq_len], labels[: self.max_seq_len], TRUNCATED
        trained = len(labels) - labels.count(IGNORE)
        if not trained:
            reason = f"no trained token left within max_seq_len {self.max_seq_len}"
            return Row([], [], full_length, 0, UNTRAINED, reason)
        return Row(ids, labels, full_length, trained, status, "")


def _parity_reason(tokenizer, actual: list[int], expected: list[int]) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), min(len(actual), len(expected))
    )

    def show(ids: list[int]) -> str:
        return repr(tokenizer.decode(ids[at : at + 3]))

    return (
        f"the prompt's tokens differ from the inference tokenization at token {at} ({show(actual)} in the example, "
        f"{show(expected)} alone): a token merges across the prompt/response boundary or the template renders "
        "the prompt differently"
    )


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
    )
