"""Data: read sources, apply the template, tokenize with loss masks, check train/inference parity, cache.

``prepare(recipe, tokenizer)`` is what training calls; ``prompt_ids`` and ``stop_token_ids`` are what
generation calls, so both sides tokenize prompts the same way.
"""

from neftune_cli.data.pipeline import PreparedData, prepare, prompt_ids, stop_token_ids
from neftune_cli.data.report import Report

__all__ = ["PreparedData", "Report", "prepare", "prompt_ids", "stop_token_ids"]
