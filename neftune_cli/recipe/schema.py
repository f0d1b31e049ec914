"""The recipe: one typed schema, loading from YAML, ``--set`` overrides and provenance.

The pydantic models below are the single source of truth for every key, its default, its validation and
its documentation (``Field(description=...)`` feeds ``neftune validate`` and the README's recipe reference).
Unknown keys are errors at every depth, never silently dropped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neftune_cli.io.errors import RecipeError

BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    # allow_inf_nan: YAML reads 1e309 as infinity and .nan as NaN; no key of ours means either.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


class RopeScaling(Section):
    """The keys transformers' RoPE scaling reads; which of them a type requires is checked at model load."""

    type: Literal[ROPE_TYPES] = Field(description="Scaling method (HF configs also call this key rope_type).")
    factor: float = Field(gt=0, description="Context extension factor.")
    original_max_position_embeddings: int | None = Field(None, ge=1, description="Pre-extension context (yarn...).")
    attention_factor: float | None = Field(None, gt=0, description="yarn / longrope attention scaling.")
    beta_fast: float | None = Field(None, description="yarn.")
    beta_slow: float | None = Field(None, description="yarn.")
    low_freq_factor: float | None = Field(None, description="llama3.")
    high_freq_factor: float | None = Field(None, description="llama3.")
    short_factor: list[float] | None = Field(None, description="longrope.")
    long_factor: list[float] | None = Field(None, description="longrope.")

    @model_validator(mode="before")
    @classmethod
    def _rope_type_alias(cls, raw):
        if isinstance(raw, dict) and "rope_type" in raw:
            raw = dict(raw)
            rope_type = raw.pop("rope_type")
            if raw.setdefault("type", rope_type) != rope_type:
                raise ValueError("type and rope_type differ; give one of them")
        return raw

    def as_config(self) -> dict[str, Any]:
        return {"rope_type": self.type, **self.model_dump(exclude={"type"}, exclude_none=True)}


class ModelSection(Section):
    name_or_path: str = Field(
        description="Hub id, local folder, or `builtin:tiny-llama` (a small model built locally for demos and tests)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and compute dtype. auto: bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel passed to transformers. With batching: pack, flash_attention_2 (the flash-attn "
        "package) and flex_attention (PyTorch's own, a block-sparse mask per packed row) skip the attention across "
        "examples that sdpa/eager compute and mask; flex_attention trains on CUDA only (PyTorch has no FlexAttention "
        "backward on a CPU).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Only when you trust it.")
    rope_scaling: RopeScaling | None = Field(
        None,
        description="RoPE scaling for the model config, e.g. {type: linear, factor: 2}; type is one of "
        + ", ".join(ROPE_TYPES) + ".",
    )
    quantization: Literal["nf4", "fp4"] | None = Field(
        None,
        description="QLoRA: load the frozen base in 4 bits (bitsandbytes, `pip install neftune-cli[qlora]`) and "
        "train LoRA on top, computing in model.dtype; nf4 is the QLoRA paper's. LoRA only. null: no quantization.",
    )
    double_quant: bool = Field(
        True, description="With quantization: quantize the 4-bit blocks' scales too (about 0.37 bits/parameter less)."
    )


class SourceSection(Section):
    # The record fields that `fields` can rename: the names neftune_cli.data.formats reads.
    FIELD_NAMES: ClassVar[tuple[str, ...]] = (
        "instruction", "input", "output", "system", "conversations", "from", "value", "messages", "role", "content"
    )

    path: str = Field(description="Hub dataset id, a .json/.jsonl/.parquet/.csv file, or a folder of them.")
    format: Literal["alpaca", "sharegpt", "messages", "auto"] = Field(
        "auto",
        description="alpaca: instruction/input/output(/system); sharegpt: conversations of {from, value}; "
        "messages: messages of {role, content}; auto detects it from the records and logs what it picked.",
    )
    fields: dict[str, str] | None = Field(
        None,
        description="Column renames, our name -> name in the file, e.g. {instruction: question, output: answer}. "
        "Our names: instruction, input, output, system, conversations, from, value, messages, role, content.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many records (the first ones, bad records included)."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Resampling factor for this source's training examples (seeded by train.seed): 2 repeats every "
        "example twice, 0.5 keeps a random half, 1.5 keeps all plus a random half. Realised counts are reported.",
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str] | None) -> dict[str, str] | None:
        unknown = sorted(set(fields or {}) - set(cls.FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown field name {', '.join(unknown)}; our names are {', '.join(cls.FIELD_NAMES)}")
        return fields


class DataSection(Section):
    sources: list[SourceSection] = Field(min_length=1, description="Training data; several are concatenated.")
    eval_sources: list[SourceSection] = Field(
        default_factory=list, description="Held-out data for eval loss (instead of eval_fraction/eval_size)."
    )
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of the training examples (seeded) for eval loss."
    )
    eval_size: int | None = Field(None, ge=1, description="Hold out this many training examples for eval loss.")
    template: Literal["alpaca", "chat", "custom"] = Field(
        "alpaca",
        description="alpaca: the Stanford Alpaca prompt (a record's system text replaces its first sentence; a "
        "conversation must be one user/assistant exchange); chat: the tokenizer's chat template; "
        "custom: the jinja template in data.chat_template. Under chat/custom an alpaca record becomes "
        "[system, user: instruction + blank line + input, assistant: output].",
    )
    chat_template: str | None = Field(None, description="Jinja chat template, used when template is custom.")

    @field_validator("chat_template")
    @classmethod
    def _jinja_syntax(cls, template: str | None) -> str | None:
        if template and (problem := jinja_syntax_error(template)):
            raise ValueError(problem)
        return template
    max_seq_len: int = Field(512, ge=8, description="Longest example in tokens.")
    overlength: Literal["truncate", "drop"] = Field(
        "truncate", description="Longer examples: truncate (keep the start) or drop. Both are counted."
    )
    train_on: Literal["all_turns", "last_turn"] = Field(
        "all_turns", description="Which assistant turns of a conversation are trained."
    )
    train_on_inputs: bool = Field(False, description="Train on every real token, prompts included.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad record (exit 2); skip: skip and report them."
    )
    num_proc: int = Field(1, ge=1, description="Processes for tokenization.")
    cache: bool = Field(
        True,
        description="Reuse the tokenized data from $NEFTUNE_CACHE/data/<fingerprint> when nothing that affects "
        "the tokens changed; false: always tokenize, write nothing.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.template == "custom" and not self.chat_template:
            raise ValueError("template is custom but data.chat_template is empty; give a jinja template")
        if self.template != "custom" and self.chat_template:
            raise ValueError(f"data.chat_template is set but template is {self.template}; set template: custom")
        held_out = [k for k in ("eval_fraction", "eval_size") if getattr(self, k) is not None]
        if self.eval_sources:
            held_out.append("eval_sources")
        if len(held_out) > 1:
            raise ValueError(f"choose one of {', '.join(held_out)}")
        weighted = [str(i) for i, s in enumerate(self.eval_sources) if s.weight is not None]
        if weighted:
            raise ValueError(f"data.eval_sources[{', '.join(weighted)}].weight: weights apply to training sources only")
        return self


def jinja_syntax_error(template: str) -> str | None:
    """Why a chat template does not parse (checked once, up front, instead of failing on every record)."""
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        return f"jinja syntax error at line {e.lineno} of the template: {e.message}"
    return None


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: scale = alpha / r (rsLoRA: alpha / sqrt(r)).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="all-linear (every linear layer but the output head) or a list of module names."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head]."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


class NeftuneSection(Section):
    alpha: float | None = Field(5.0, ge=0, description="NEFTune noise alpha; 0 or null: no noise. Paper: 5, 10, 15.")
    scale: Literal["paper", "hf"] = Field(
        "paper",
        description="paper: noise scaled by each example's own length (padding/packing-proof); "
        "hf: transformers' formula (padded length), to reproduce HF-based runs.",
    )


class TrainSection(Section):
    epochs: int = Field(3, ge=1, description="Passes over the training data (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null: no clipping.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    batching: Literal["pack", "pad"] = Field(
        "pack",
        description="pack: each micro-batch is one padding-free row (attention does not cross examples); "
        "pad: pad to the longest, length-grouped.",
    )
    pack_tokens: int | None = Field(
        None,
        ge=8,
        description="batching: pack only. Fill each packed micro-batch with examples up to this many tokens "
        "(micro_batch_size is then not used), so every forward is about the same size whatever the example "
        "lengths: steadier memory and a full GPU. E.g. 8192 or 16384 on a GPU.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp (a model copy per process) or fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded across processes, for models that do not fit one GPU). Ignored with one process.",
    )
    seed: int = Field(0, description="Seed for initialisation, data order, dropout and noise.")
    log_every: int = Field(10, ge=1, description="Steps between log lines / metrics records.")
    eval_every: int | None = Field(None, ge=1, description="Steps between eval-loss runs (and one at the end).")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="Where metrics go besides metrics.jsonl: [tensorboard] writes TensorBoard events to "
        "OUTPUT_DIR/tensorboard (pip install 'neftune-cli[tensorboard]').",
    )


class OutputSection(Section):
    dir: str = Field(
        min_length=1, pattern=r"\S", description="Run directory (relative to the current working directory)."
    )


class Recipe(Section):
    model: ModelSection
    data: DataSection
    finetune: Literal["lora", "full"] = Field("lora", description="lora: train a LoRA adapter; full: all weights.")
    lora: LoraSection | None = Field(default_factory=LoraSection, description="LoRA settings (finetune: lora).")
    neftune: NeftuneSection = Field(default_factory=NeftuneSection, description="NEFTune noise.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation and the loop.")
    output: OutputSection

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.finetune == "full" and self.lora is not None and "lora" in self.model_fields_set:
            raise ValueError("finetune is full but a lora section is given; remove it or set lora: null")
        if self.finetune == "lora" and self.lora is None:
            raise ValueError("lora is null; set finetune: full for full fine-tuning")
        if self.model.quantization and self.finetune == "full":
            raise ValueError(f"model.quantization: {self.model.quantization} freezes the base in 4 bits, which full "
                             "fine-tuning cannot train; set finetune: lora (QLoRA) or model.quantization: null")
        if self.model.quantization and self.train.distributed == "fsdp":
            raise ValueError("model.quantization with train.distributed: fsdp is not supported (FSDP cannot shard the "
                             "4-bit weights); set train.distributed: ddp")
        return self

    @model_validator(mode="after")
    def _pack_tokens(self) -> Recipe:
        budget = self.train.pack_tokens
        if budget is not None and self.train.batching != "pack":
            raise ValueError("train.pack_tokens fills packed micro-batches; set train.batching: pack or remove it")
        if budget is not None and budget < self.data.max_seq_len:
            raise ValueError(f"train.pack_tokens {budget} is below data.max_seq_len {self.data.max_seq_len}: the "
                             "longest example must fit in one micro-batch")
        return self

    @property
    def lora_or_none(self) -> LoraSection | None:
        return self.lora if self.finetune == "lora" else None


def warnings_for(recipe: Recipe) -> list[str]:
    """Valid but probably unintended settings, said before any GPU time is spent."""
    out = []
    if recipe.neftune.alpha and recipe.neftune.scale == "hf" and recipe.train.batching == "pack":
        out.append("neftune.scale: hf with train.batching: pack scales the noise by the packed row's length, so each "
                   "example gets about sqrt(L_example / L_row) of the intended noise (transformers issue #34659); "
                   "scale: paper does not")
    limit = _position_limit(recipe.model.name_or_path)
    if limit is not None and recipe.data.max_seq_len > limit:
        out.append(f"data.max_seq_len {recipe.data.max_seq_len} is beyond the model's {limit} positions "
                   "(max_position_embeddings); longer examples will meet positions it was never trained on")
    return out


def _position_limit(name_or_path: str) -> int | None:
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


# --- loading ---------------------------------------------------------------------------------------


# A recipe is a few hundred values. Bounds far above that stop YAML alias bombs (a few lines that expand to
# billions of values) before anything walks, validates or prints the expansion.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000
MAX_SHOWN_CHARS = 200  # longest value echoed in a message
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
    recipe_leaves = set(_leaves(raw))
    for key in _leaves(recipe.model_dump(mode="json")):
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
                self.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key {_shown(key)} "
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


def _shown(value: Any) -> str:
    """A value as messages echo it: JSON, cut to MAX_SHOWN_CHARS."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + f"... ({len(text):,} chars)"


def validate(raw: dict, where: str | None = None, set_keys: list[str] = ()) -> Recipe:
    """The Recipe, or a RecipeError blaming each problem on the file or on the --set that made it."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            key = _dotted(error.get("loc", ())).replace("[", ".").replace("]", "")
            culprit = next((k for k in set_keys if key == k or key.startswith(k + ".")), None)
            prefix = f"--set {culprit}: " if culprit else (f"{where}: " if where else "")
            problems.append(prefix + _describe(error))
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise RecipeError(problems) from None


def resolve_paths(recipe: Recipe, base_dir: Path, where: str | None = None) -> Recipe:
    """Make local paths absolute against the recipe's folder; check that local data files exist.

    A source path that exists locally is a file; one that looks like a hub id (``org/name``, no file
    extension) is left for the hub; anything else is a missing file and an error now, not after model loading.
    """
    recipe = recipe.model_copy(deep=True)
    problems = []
    model_path = recipe.model.name_or_path
    if not model_path.startswith(BUILTIN_PREFIX):
        local = _local(model_path, base_dir)
        if local is not None:
            recipe.model.name_or_path = str(local)
        elif _looks_like_path(model_path):
            problems.append(f"model.name_or_path: folder not found: {model_path} (resolved against {base_dir})")
    for section in ("sources", "eval_sources"):
        for i, source in enumerate(getattr(recipe.data, section)):
            local = _local(source.path, base_dir)
            if local is not None:
                source.path = str(local)
            elif _looks_like_path(source.path):
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


def _looks_like_path(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name`` without a file extension; everything else is meant as a path."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return Path(path).suffix.lower() in {".json", ".jsonl", ".parquet", ".csv", ".yaml", ".txt"}


# --- overrides -------------------------------------------------------------------------------------


def apply_override(raw: dict, item: str) -> str:
    """Apply one ``--set a.b.c=value`` to the raw recipe dict (value parsed as YAML). Returns the key."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {_shown(item)}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: the value {_shown(value_text)} is not valid YAML") from None
    parts = key.split(".")
    model: type[BaseModel] | None = Recipe
    node: Any = raw
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
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
            raise RecipeError(f"--set {key}: no such key {dotted}{_suggest(part, options, parts[:depth])}")
        field_model = _section_model(model, part)
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
            model = field_model
    return key


def _section_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The pydantic model of a section field (also inside list[...] / X | None), or None for a leaf."""
    annotation = model.model_fields[name].annotation
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
        stack.extend(getattr(t, "__args__", ()))
    return None


# --- error messages --------------------------------------------------------------------------------


def _describe(err: dict) -> str:
    loc = err.get("loc", ())
    key = _dotted(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        options = list(parent.model_fields) if parent else []
        return f"unknown key {key}{_suggest(str(loc[-1]), options, loc[:-1])}"
    if kind == "missing":
        return f"{key}: required key is missing"
    value = err.get("input")
    shown = _shown(value) if not isinstance(value, dict) else "a mapping"
    message = err.get("msg", "invalid")
    message = message.removeprefix("Value error, ")
    if not key:
        return message
    return f"{key}: {message} (got {shown})"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        # pydantic adds the union member name to loc (e.g. 'list[str]', 'literal[...]'); skip those
        if isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"}):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part not in model.model_fields:
            return None
        model = _section_model(model, part)
    return model


def _suggest(name: str, options: list[str], parent: tuple | list) -> str:
    if not parent:
        # a section key written at the top level, e.g. `lr: 1e-4` instead of `train.lr`
        for section in options:
            sub = _section_model(Recipe, section)
            if sub and name in sub.model_fields:
                return f" (did you mean `{section}.{name}`?)"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not close:
        return f"; valid keys: {', '.join(options)}" if options else ""
    prefix = ".".join(str(p) for p in parent if not isinstance(p, int))
    return f" (did you mean `{prefix + '.' if prefix else ''}{close[0]}`?)"


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        out = []
        for k, v in tree.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = []
        for i, v in enumerate(tree):
            out += _leaves(v, f"{prefix}.{i}")
        return out
    return [prefix]


# --- serialisation and hashes ----------------------------------------------------------------------


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- documentation ---------------------------------------------------------------------------------


def reference_markdown() -> str:
    """The README's recipe reference, generated from the schema so the two cannot drift apart."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _section_model(model, name)
            is_list = sub is not None and "list" in str(field.annotation)
            if sub is not None:
                if field.description:
                    lines.append(f"| `{key}` | | {field.description} |")
                walk(sub, f"{key}[]." if is_list else f"{key}.")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"`{json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)}`"
            lines.append(f"| `{key}` | {default} | {(field.description or '').replace('|', '/')} |")

    walk(Recipe, "")
    return "\n".join(lines) + "\n"
