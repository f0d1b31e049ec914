"""Valid but probably unintended settings: the checks that need more than the recipe (a model config on disk).

Said by validate, train and data before any work, as warnings.
"""

from __future__ import annotations

from neftune_cli.models.loading import local_config
from neftune_cli.recipe.schema import Recipe


def warnings_for(recipe: Recipe) -> list[str]:
    """Valid but probably unintended settings, said before any GPU time is spent."""
    out = []
    if recipe.neftune.alpha and recipe.neftune.scale == "hf" and recipe.train.batching == "pack":
        out.append("neftune.scale: hf with train.batching: pack scales the noise by the packed row's length, so each "
                   "example gets about sqrt(L_example / L_row) of the intended noise (transformers issue #34659); "
                   "scale: paper does not")
    config = local_config(recipe.model)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and recipe.data.max_seq_len > limit:
        out.append(f"data.max_seq_len {recipe.data.max_seq_len} is beyond the model's {limit} positions "
                   "(max_position_embeddings); longer examples will meet positions it was never trained on")
    return out
