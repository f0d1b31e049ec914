"""The tiny LoRA run that end-to-end tests start from, as recipe YAML (imported as ``run_helpers``).

builtin:tiny-llama with LoRA and NEFTune alpha 5, on the Alpaca records in train.jsonl beside the recipe (and
eval.jsonl, when asked); each test module states only the settings its tests are about.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

BASE = {
    "model": {"name_or_path": "builtin:tiny-llama"},
    "data": {"sources": [{"path": "train.jsonl", "format": "alpaca"}], "max_seq_len": 128},
    "lora": {"r": 8, "alpha": 16},
    "neftune": {"alpha": 5},
    "train": {"micro_batch_size": 4, "lr": 3.0e-3, "log_every": 1},
}


def tiny_run_yaml(out: str | Path, *, eval_data: bool = False, **sections: dict | None) -> str:
    """BASE with each keyword's keys set in its section (None leaves the section out), eval.jsonl as the eval data
    when asked, and output.dir `out`."""
    recipe = copy.deepcopy(BASE)
    if eval_data:
        recipe["data"]["eval_sources"] = [{"path": "eval.jsonl", "format": "alpaca"}]
    for name, keys in sections.items():
        if keys is None:
            recipe.pop(name)
        else:
            recipe.setdefault(name, {}).update(keys)
    recipe["output"] = {"dir": str(out)}
    return yaml.safe_dump(recipe, sort_keys=False)
