"""Held-out loss and perplexity of a run or a model: no noise, the training masks, the training batches.

It runs the training loop's own `evaluate` with the same batch builder, batch size and adapter (not merged), so
on a run's eval data it gives the eval_loss the loop logged.
"""

from __future__ import annotations

import math
from pathlib import Path

from neftune_cli.data.batching import IGNORE, batch_builder
from neftune_cli.data.pipeline import prepare
from neftune_cli.infer.target import Target, inference_device
from neftune_cli.io.console import log
from neftune_cli.io.errors import UsageError
from neftune_cli.models.loading import resolve_dtype
from neftune_cli.recipe.load import load_recipe
from neftune_cli.recipe.schema import Recipe
from neftune_cli.train.precision import Precision
from neftune_cli.train.step import CausalLMLoss, check_forward, evaluate


def has_eval_data(target: Target) -> bool:
    data = target.data
    return target.recipe is not None and bool(data.eval_sources or data.eval_fraction or data.eval_size)


def heldout_loss(target: Target, data_spec: Path | None = None, batch_size: int | None = None) -> dict:
    """{"eval_loss", "perplexity", "examples", "trained_tokens", "data"} on the run's eval split, a recipe's eval
    split (data_spec a .yaml), or every example of a data file (formatted with the run's or --template's template)."""
    recipe, split = _eval_recipe(target, data_spec)
    tokenizer = target.tokenizer()
    prepared = prepare(recipe, tokenizer, log=log)
    dataset = prepared.eval if split == "eval" else prepared.train
    if dataset is None or len(dataset) == 0:
        raise UsageError(f"{data_spec}: the recipe holds out no eval data (data.eval_sources, eval_fraction or "
                         "eval_size)")
    device = inference_device()
    precision = Precision.of(resolve_dtype(recipe.model.dtype, device), recipe.train.precision)  # as training ran
    lm_loss = CausalLMLoss(target.load(device, merge=False), None, recipe.neftune.scale, precision=precision)
    check_forward(lm_loss, target.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # as training pads
    batch_of = batch_builder(recipe.train.batching, pad_id, device)
    loss = evaluate(lm_loss, dataset, batch_of, batch_size or recipe.train.micro_batch_size)
    # labels are unshifted: each trained label is one target (the shifted first token never is)
    trained = sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in dataset["labels"])
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(dataset),
            "trained_tokens": trained, "data": str(data_spec) if data_spec else "the run's eval split"}


def _eval_recipe(target: Target, data_spec: Path | None) -> tuple[Recipe, str]:
    if data_spec is None:
        if not has_eval_data(target):
            what = "a run without eval data" if target.recipe is not None else "a model that is not a run"
            raise UsageError(f"{target.name} is {what}; give --data RECIPE_OR_FILE")
        return target.recipe, "eval"
    if data_spec.suffix in (".yaml", ".yml"):
        other = load_recipe(data_spec).recipe
        base = target.recipe or _plain_recipe(target)
        return base.model_copy(update={"data": other.data}), "eval"
    if not data_spec.exists():
        raise UsageError(f"--data {data_spec}: file not found")
    base = target.recipe or _plain_recipe(target)
    data = base.data.model_copy(update={"sources": [base.data.sources[0].model_copy(
        update={"path": str(data_spec.resolve()), "format": "auto", "fields": None, "max_samples": None,
                "weight": None})], "eval_sources": [], "eval_fraction": None, "eval_size": None})
    return base.model_copy(update={"data": data}), "train"


def _plain_recipe(target: Target) -> Recipe:
    return Recipe.model_validate({"model": target.model.model_dump(), "data": target.data.model_dump(),
                                  "output": {"dir": "unused"}, "train": {"batching": "pad"}})
