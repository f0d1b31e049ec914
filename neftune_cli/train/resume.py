"""What makes a resumed run continue exactly: the same setup, and every random stream restored."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from neftune_cli.data.pipeline import PreparedData
from neftune_cli.io.console import log
from neftune_cli.io.errors import UsageError
from neftune_cli.recipe.load import saved_recipe, stable_hash
from neftune_cli.recipe.schema import ModelSection, Recipe
from neftune_cli.train import parallel
from neftune_cli.train.checkpoint import Checkpoint

# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.report_to")


def check_resumable(checkpoint: Checkpoint, recipe: Recipe, data: PreparedData, force: bool,
                    dist: parallel.Dist = parallel.SINGLE) -> list[str]:
    """The changes since the checkpoint's setup that --force lets through; without --force any change is refused."""
    meta = checkpoint.meta
    written_by = meta.get("world_size", 1)
    if written_by != dist.world:  # each process's noise, dropout and data position belong to that process
        raise UsageError(f"--resume: {checkpoint.folder} was written by {written_by} process(es); resume with the "
                         f"same number (this run has {dist.world})")
    changes = []
    before, now = with_defaults(meta["recipe"]), saved_recipe(recipe.model_dump(mode="json"))
    # The same data or model folder (by what it holds) where a moved project put it is no change.
    same_data = meta["data_fingerprint"] == data.fingerprint
    model_was, model_is = meta.get("model_identity"), folder_identity(recipe.model)  # None: not a local folder
    before, now = (flatten(_without_locations(tree, same_data, model_was is not None and model_was == model_is))
                   for tree in (before, now))
    for key in sorted(set(before) | set(now)):
        if key not in RESUME_SAFE_KEYS and before.get(key) != now.get(key):
            changes.append(f"{key}: {json.dumps(before.get(key))} -> {json.dumps(now.get(key))}")
    if model_was is not None and model_is is not None and model_was != model_is:
        changes.append("model.name_or_path: the folder's config or weight files changed")
    if meta["tokenizer_fingerprint"] != data.tokenizer_fingerprint:
        changes.append("the tokenizer changed")
    elif meta["data_fingerprint"] != data.fingerprint:
        changes.append("the data changed")
    if changes and not force:
        raise UsageError(f"--resume: the run in {checkpoint.folder.parent.parent} was made with a different setup "
                         f"({'; '.join(changes)}); undo the change or add --force")
    for change in changes:
        log(f"warning: resuming despite a change (--force): {change}")
    return changes


def _without_locations(tree: dict, data: bool, model: bool) -> dict:
    """The recipe without the paths a moved project changes: with `data`, the data's paths and output.dir (the
    data fingerprint covers the data's content, and output.dir is where this checkpoint was found); with `model`,
    the model folder's."""
    tree = json.loads(json.dumps(tree))
    if data:
        tree.get("output", {}).pop("dir", None)
        for section in ("sources", "eval_sources"):
            for source in tree.get("data", {}).get(section) or []:
                if isinstance(source, dict):
                    source.pop("path", None)
    if model:
        tree.get("model", {}).pop("name_or_path", None)
    return tree


def folder_identity(spec: ModelSection) -> str | None:
    """A local model folder by what it holds: its config and its weight files' names and sizes. The same folder
    moved or copied keeps it (a content hash would read every weight); None for a hub id or a builtin, whose name
    is their identity."""
    folder = Path(spec.name_or_path)
    if not (folder / "config.json").is_file():
        return None
    weights = sorted((f.name, f.stat().st_size) for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    return stable_hash({"config": json.loads((folder / "config.json").read_text(encoding="utf-8")), "weights": weights})


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
