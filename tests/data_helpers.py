"""Helpers shared by the data tests (imported as ``data_helpers``).

``word_tokenizer`` builds a word-level fast tokenizer whose tokens are the whitespace-separated words of the
texts it is given, so expected token sequences can be written by hand and read at a glance. ``marked`` shows
an example in that spirit: tokens separated by spaces, trained runs in ``[...]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from neftune_cli.recipe.load import validate
from neftune_cli.recipe.schema import Recipe

BOS, EOS, UNK, EOT = "<s>", "</s>", "<unk>", "<eot>"

# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca train.py), typed out here independently of the code.
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def recipe(sources: list, **data) -> Recipe:
    """A validated recipe with these data sources (paths or source dicts); caching off unless asked for."""
    data.setdefault("cache", False)
    specs = [s if isinstance(s, dict) else {"path": str(s)} for s in sources]
    return validate({"model": {"name_or_path": "unused"}, "data": {"sources": specs, **data}, "output": {"dir": "x"}})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def word_tokenizer(*texts: str, chat_template: str | None = None, add_bos: bool = True):
    """A fast word-level tokenizer: one token per whitespace-separated word of ``texts`` and of the Alpaca
    prompts; BOS/EOS/EOT are special tokens; BOS is prepended by the post-processor when add_bos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, EOT]
    words = sorted(set(" ".join((*texts, STANFORD_INPUT, STANFORD_NO_INPUT)).split()) - set(specials))
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, additional_special_tokens=[EOT]
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """``apply_chat_template``'s token ids, the serving reference, under transformers 4.x (a list by default) and
    5.x (a BatchEncoding by default) alike."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def marked(tokenizer, example: dict) -> str:
    """``<s> a b [c </s>]``: the example's tokens, trained runs in brackets. Checks labels are ids or -100."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == example["length"]
    assert all(label in (token, -100) for token, label in zip(ids, labels, strict=True))
    out, inside = [], False
    for token, label in zip(tokenizer.convert_ids_to_tokens(ids), labels, strict=True):
        trained = label != -100
        if trained and not inside:
            token = "[" + token
        elif inside and not trained:
            out[-1] += "]"
        out.append(token)
        inside = trained
    if inside:
        out[-1] += "]"
    return " ".join(out)


def trained_text(tokenizer, example: dict) -> str:
    ids = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prepared(tmp_path: Path, records: list, tokenizer, name: str = "data.jsonl", log=None, **data):
    """prepare() on these records written as JSON lines (source options via ``source={...}``)."""
    from neftune_cli.data.pipeline import prepare

    source = {"path": str(write_jsonl(tmp_path / name, records)), **data.pop("source", {})}
    return prepare(recipe([source], **data), tokenizer, log=log or (lambda message: None))


def save_with_tokenizer(model, folder: Path, tokenizer_dir: Path) -> Path:
    """A model folder as a hub download looks: `model`'s weights and config beside the tokenizer files (and chat
    template) of `tokenizer_dir`, e.g. a random model of another family with the builtin tokenizer."""
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if "token" in file.name or file.suffix == ".jinja":
            shutil.copy(file, folder / file.name)
    return folder
