"""Valid but probably unintended settings: the checks that need more than the recipe (a model config on disk).

Said by validate, train and data before any work, as warnings.
"""

from __future__ import annotations

import json
from pathlib import Path

from neftune_cli.recipe.schema import BUILTIN_PREFIX, Recipe


def warnings_for(recipe: Recipe) -> list[str]:
    """Valid but probably unintended settings, said before any GPU time is spent."""
    out = []
    if recipe.neftune.alpha and recipe.neftune.scale == "hf" and recipe.train.batching == "pack":
        out.append("neftune.scale: hf with train.batching: pack scales the noise by the packed row's length, so each "
                   "example gets about sqrt(L_example / L_row) of the intended noise (transformers issue #34659); "
                   "scale: paper does not")
    limit = position_limit(recipe.model.name_or_path)
    if limit is not None and recipe.data.max_seq_len > limit:
        out.append(f"data.max_seq_len {recipe.data.max_seq_len} is beyond the model's {limit} positions "
                   "(max_position_embeddings); longer examples will meet positions it was never trained on")
    return out


def position_limit(name_or_path: str) -> int | None:
    """max_position_embeddings from a config we can read without a download (local, builtin or hub cache)."""
    from neftune_cli.demo import builtin

    if name_or_path.startswith(BUILTIN_PREFIX):
        spec = builtin.MODELS.get(name_or_path[len(BUILTIN_PREFIX):])
        return spec["max_position_embeddings"] if spec else None
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name_or_path, "config.json")
        except ValueError:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None
