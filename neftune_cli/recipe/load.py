"""Loading a recipe: YAML (bounded, duplicate keys reported), ``--set`` overrides, validation, local paths resolved
against the recipe's folder, and provenance (where each value came from).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from neftune_cli.data.sources import looks_like_path
from neftune_cli.io.errors import RecipeError
from neftune_cli.recipe.checks import warnings_for
from neftune_cli.recipe.messages import describe, dotted_key, shown, suggest
from neftune_cli.recipe.schema import BUILTIN_PREFIX, Recipe, section_model

# A recipe is a few hundred values. Bounds far above that stop YAML alias bombs (a few lines that expand to
# billions of values) before anything walks, validates or prints the expansion.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000
MAX_PROBLEMS = 10  # lines of one validation error


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from and where each value came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    provenance: dict[str, str]  # dotted key -> "default" | "recipe" | "--set"
    file_warnings: list[str] = []  # about the file itself (duplicate keys)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def warnings(self) -> list[str]:
        """Everything valid but probably unintended: said by validate, train and data before any work."""
        return self.file_warnings + warnings_for(self.recipe)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override, validate and resolve a recipe file. Raises RecipeError with one line per problem."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder; give the recipe's YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"the file is {path.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}",
                              where)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("not a UTF-8 text file", where) from None
    except OSError as e:
        raise RecipeError(f"cannot read the file: {e.strerror}", where) from None
    loader = _RecipeLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"YAML syntax error at {line}{problem}", where) from None
    finally:
        loader.dispose()
    if raw is None:
        raise RecipeError("the file is empty; a recipe needs at least model, data and output sections", where)
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of sections (model, data, ...), not a {type(raw).__name__}", where)
    if _count_values(raw, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise RecipeError(f"the recipe expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases?)", where)

    set_keys = []
    for item in overrides or []:
        set_keys.append(apply_override(raw, item))
    recipe = validate(raw, where, set_keys)
    recipe = resolve_paths(recipe, path.parent, where)
    provenance = {}
    recipe_leaves = set(leaves(raw))
    for key in leaves(recipe.model_dump(mode="json")):
        if any(key == k or key.startswith(k + ".") for k in set_keys):
            provenance[key] = "--set"
        elif key in recipe_leaves:
            provenance[key] = "recipe"
        else:
            provenance[key] = "default"
    warnings = [f"{where}: {w}" for w in loader.duplicates]
    return LoadedRecipe(recipe=recipe, path=path.resolve(), provenance=provenance, file_warnings=warnings)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that records duplicate keys (plain YAML silently keeps the last one)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                self.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key {shown(key)} "
                                       "(the last one wins)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _count_values(tree: Any, limit: int) -> int:
    """Values in the tree as if every alias were written out; stops counting past `limit`."""
    count, stack = 0, [tree]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def validate(raw: dict, where: str | None = None, set_keys: list[str] = ()) -> Recipe:
    """The Recipe, or a RecipeError blaming each problem on the file or on the --set that made it."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            key = dotted_key(error.get("loc", ())).replace("[", ".").replace("]", "")
            culprit = next((k for k in set_keys if key == k or key.startswith(k + ".")), None)
            prefix = f"--set {culprit}: " if culprit else (f"{where}: " if where else "")
            problems.append(prefix + describe(error))
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise RecipeError(problems) from None


def resolve_paths(recipe: Recipe, base_dir: Path, where: str | None = None) -> Recipe:
    """Make local paths absolute against the recipe's folder; check that local data files exist.

    A source path that exists locally is a file; one that looks like a hub id (``org/name``, no file
    extension) is left for the hub; anything else is a missing file and an error now, not after model loading.
    """
    recipe = recipe.model_copy(deep=True)
    recipe.output.dir = str(Path(recipe.output.dir).expanduser())  # as data paths are: never a folder named ~
    problems = []
    model_path = recipe.model.name_or_path
    if not model_path.startswith(BUILTIN_PREFIX):
        local = _local(model_path, base_dir)
        if local is not None:
            recipe.model.name_or_path = str(local)
        elif looks_like_path(model_path):
            problems.append(f"model.name_or_path: folder not found: {model_path} (resolved against {base_dir})")
    for section in ("sources", "eval_sources"):
        for i, source in enumerate(getattr(recipe.data, section)):
            local = _local(source.path, base_dir)
            if local is not None:
                source.path = str(local)
            elif looks_like_path(source.path):
                problems.append(
                    f"data.{section}[{i}].path: file not found: {source.path} (resolved against {base_dir})"
                )
    if problems:
        raise RecipeError(problems, where)
    return recipe


def _local(path: str, base_dir: Path) -> Path | None:
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base_dir / p
    return p.resolve() if p.exists() else None


# --- overrides -------------------------------------------------------------------------------------


def apply_override(raw: dict, item: str) -> str:
    """Apply one ``--set a.b.c=value`` to the raw recipe dict (value parsed as YAML). Returns the key."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {shown(item)}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    if len(value_text.encode()) > MAX_RECIPE_BYTES:
        raise RecipeError(f"--set {key}: the value is longer than a recipe may be ({MAX_RECIPE_BYTES:,} bytes)")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: the value {shown(value_text)} is not valid YAML") from None
    if _count_values(value, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:  # the same bound as the file's
        raise RecipeError(f"--set {key}: the value expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases?)")
    parts = key.split(".")
    model: type[BaseModel] | None = Recipe
    node: Any = raw
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if not isinstance(node, dict | list):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:depth])} is {shown(node)}, not a section with keys")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {dotted} is not an index of a list of {len(node)}")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if model is None or part not in model.model_fields:
            options = list(model.model_fields) if model else []
            raise RecipeError(f"--set {key}: no such key {dotted}{suggest(part, options, parts[:depth])}")
        field_model = section_model(model, part)
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
            model = field_model
    return key



def leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        out = []
        for k, v in tree.items():
            out += leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = []
        for i, v in enumerate(tree):
            out += leaves(v, f"{prefix}.{i}")
        return out
    return [prefix]


def lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of `leaves` (list items by index)."""
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as a run records it, so that it validates when read back: lora: null under finetune:
    full (its default section would be refused as one given)."""
    return yaml.safe_dump(saved_recipe(recipe.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


def saved_recipe(tree: Any) -> Any:
    """A dumped recipe as a run records it and validate takes it back: under finetune: full the lora section means
    nothing, and is null (runs written before this carry the default section there)."""
    if isinstance(tree, dict) and tree.get("finetune") == "full":
        return {**tree, "lora": None}
    return tree


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
