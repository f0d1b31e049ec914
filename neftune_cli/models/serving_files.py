"""What a run hands on beside its weights: the base's tokenizer files, the chat template it trained with, and the
tokens generation stops on, in a form transformers 4.x and 5.x, vLLM and llama.cpp's converter all read.

Serving tools read files, not our code. So the base's tokenizer files are copied as the base shipped them
(``tokenizer.model`` included: llama.cpp's ``convert_hf_to_gguf.py`` takes the SentencePiece scores from it), not
re-saved: transformers 5's ``save_pretrained`` writes a tokenizer class that 4.x cannot load and drops
``tokenizer.model``. Only ``tokenizer_config.json`` changes: it gets the training template as ``chat_template``
(also written as ``chat_template.jinja``, which both versions prefer when present), and a 5.x-only class or
special-token list is rewritten in the names both versions know. ``generation_config.json`` stops on EOS and the
template's end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neftune_cli.recipe.schema import DataSection

# The tokenizer files a base may ship; whichever it has are copied byte for byte (tokenizer_config.json aside).
BASE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
CONFIG = "tokenizer_config.json"
TEMPLATE = "chat_template.jinja"
GENERATION = "generation_config.json"

# transformers 5 names that 4.x does not load -> the names both load.
_CLASS_BOTH_LOAD = {"TokenizersBackend": "PreTrainedTokenizerFast"}


@dataclass(frozen=True)
class TokenizerFiles:
    files: dict[str, bytes]  # file name -> content

    def write(self, folder: Path) -> None:
        for name, content in self.files.items():
            (folder / name).write_bytes(content)


def tokenizer_files(base: str, data: DataSection, tokenizer) -> TokenizerFiles:
    """The files for a run on ``base`` (a local folder or hub id, as loaded) whose data section is ``data``."""
    from neftune_cli.data.pipeline import stop_token_ids  # here: merge imports this module and needs no data pipeline
    from neftune_cli.data.templates import make_template

    files = {name: content for name in BASE_FILES if (content := _base_file(base, name)) is not None}
    template = make_template(data, tokenizer).jinja
    config = loadable_config(json.loads(files.get(CONFIG, b"{}")))
    if "tokenizer_class" not in config and "tokenizer.json" in files:  # a run folder may have no config.json
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = template
    files[CONFIG] = _json(config)
    files[TEMPLATE] = template.encode("utf-8")
    generation = json.loads(_base_file(base, GENERATION) or b"{}")
    stops = stop_token_ids(data, tokenizer)
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    files[GENERATION] = _json(generation)
    return TokenizerFiles(files)


def loadable_config(config: dict) -> dict:
    """A tokenizer_config.json that transformers 4.x and 5.x both load (5.x saves some names 4.x rejects)."""
    config = dict(config)
    if config.get("tokenizer_class") in _CLASS_BOTH_LOAD:
        config["tokenizer_class"] = _CLASS_BOTH_LOAD[config["tokenizer_class"]]
    if isinstance(config.get("extra_special_tokens"), list):  # 5.x's list; 4.x reads a dict under that name
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    return config


def _base_file(base: str, name: str) -> bytes | None:
    """A file of the base (folder or hub cache; tokenizer loading has fetched them already), or None."""
    from transformers.utils.hub import cached_file

    path = cached_file(
        base,
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )
    return Path(path).read_bytes() if path else None


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
