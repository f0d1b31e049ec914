"""What makes a resumed run continue exactly: the same setup, and every random stream restored."""

from __future__ import annotations

import json
import random

import torch

from neftune_cli.data.pipeline import PreparedData
from neftune_cli.io.console import log
from neftune_cli.io.errors import UsageError
from neftune_cli.recipe.load import saved_recipe
from neftune_cli.recipe.schema import Recipe
from neftune_cli.train import parallel
from neftune_cli.train.checkpoint import Checkpoint

# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.report_to")


def check_resumable(checkpoint: Checkpoint, recipe: Recipe, data: PreparedData, force: bool,
                    dist: parallel.Dist = parallel.SINGLE) -> None:
    meta = checkpoint.meta
    written_by = meta.get("world_size", 1)
    if written_by != dist.world:  # each process's noise, dropout and data position belong to that process
        raise UsageError(f"--resume: {checkpoint.folder} was written by {written_by} process(es); resume with the "
                         f"same number (this run has {dist.world})")
    changes = []
    before, now = with_defaults(meta["recipe"]), saved_recipe(recipe.model_dump(mode="json"))
    if meta["data_fingerprint"] == data.fingerprint:  # the same data (by content): where it lives is no change
        before, now = _without_locations(before), _without_locations(now)
    before, now = flatten(before), flatten(now)
    for key in sorted(set(before) | set(now)):
        if key not in RESUME_SAFE_KEYS and before.get(key) != now.get(key):
            changes.append(f"{key}: {json.dumps(before.get(key))} -> {json.dumps(now.get(key))}")
    if meta["tokenizer_fingerprint"] != data.tokenizer_fingerprint:
        changes.append("the tokenizer changed")
    elif meta["data_fingerprint"] != data.fingerprint:
        changes.append("the data changed")
    if changes and not force:
        raise UsageError(f"--resume: the run in {checkpoint.folder.parent.parent} was made with a different setup "
                         f"({'; '.join(changes)}); undo the change or add --force")
    for change in changes:
        log(f"warning: resuming despite a change (--force): {change}")


def _without_locations(tree: dict) -> dict:
    """The recipe without the data's paths and output.dir, which a moved project changes (the data fingerprint
    covers the data's content, and output.dir is where this checkpoint was found)."""
    tree = json.loads(json.dumps(tree))
    tree.get("output", {}).pop("dir", None)
    for section in ("sources", "eval_sources"):
        for source in tree.get("data", {}).get(section) or []:
            if isinstance(source, dict):
                source.pop("path", None)
    return tree


def with_defaults(saved: dict) -> dict:
    """A recipe saved by an earlier version, with the keys added since at their defaults (which is how it ran)."""
    try:
        return Recipe.model_validate(saved_recipe(saved)).model_dump(mode="json")
    except ValueError:  # a key since removed or renamed: compare as saved, and the change is named
        return saved_recipe(saved)


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(noise_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
