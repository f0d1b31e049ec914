"""The recipe's schema: every key, its default, its validation and its documentation, in typed sections.

The pydantic models below are the single source of truth: ``Field(description=...)`` feeds ``neftune validate`` and
the README's recipe reference. Unknown keys are errors at every depth, never silently dropped. A leaf module: no
disk, hub or other neftune_cli import, so every stage can depend on it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel passed to transformers. auto: the best one the model supports (sdpa, else "
        "eager); a run records the kernel it used. A kernel the model does not support is an error naming those it "
        "takes. With batching: pack, flash_attention_2 (the flash-attn package) and flex_attention (PyTorch's own, a "
        "block-sparse mask per packed row) skip the attention across examples that sdpa/eager compute and mask; "
        "flex_attention trains on CUDA only (PyTorch has no FlexAttention backward on a CPU).",
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


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


class TrackingSection(Section):
    project: str | None = Field(
        None, min_length=1,
        description="W&B project, MLflow experiment, Trackio project. null: the tracker's own variable "
        "(WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME), else neftune.",
    )
    entity: str | None = Field(None, min_length=1, description="W&B entity (user or team); null: WANDB_ENTITY or "
                               "your default. The MLflow server is MLFLOW_TRACKING_URI's.")


class TrainSection(Section):
    epochs: int = Field(3, ge=1, description="Passes over the training data (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null: no clipping.")
    precision: Literal["mixed", "pure"] = Field(
        "mixed", description="mixed: trained parameters in float32, the forward under autocast in model.dtype; "
        "pure: trained parameters in model.dtype too (less memory for full fine-tuning; small updates are lost).")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="MoE models: weight of the router's load-balancing loss; null: the model's own "
        "(config.router_aux_loss_coef), 0: off. Logged as router_aux_loss.")
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
    seed: int = Field(0, ge=0, lt=2**63, description="Seed for initialisation, data order, dropout and noise.")
    log_every: int = Field(10, ge=1, description="Steps between log lines / metrics records.")
    eval_every: int | None = Field(None, ge=1, description="Steps between eval-loss runs (and one at the end).")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=list,
        description="Where metrics go besides metrics.jsonl, the same scalars (train/loss, train/lr, ..., "
        "eval/loss): tensorboard (events in OUTPUT_DIR/tensorboard), wandb, mlflow, trackio; each needs its extra, "
        "e.g. pip install 'neftune-cli[wandb]'. Rank 0 reports; --resume continues the same tracker run.",
    )
    tracking: TrackingSection = Field(default_factory=TrackingSection,
                                      description="Where wandb, mlflow and trackio put the run.")


class OutputSection(Section):
    dir: str = Field(
        min_length=1, pattern=r"\S", description="Run directory (relative to the current working directory; ~ expands)."
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



def section_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The pydantic model of a section field (also inside list[...] / X | None), or None for a leaf."""
    annotation = model.model_fields[name].annotation
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
        stack.extend(getattr(t, "__args__", ()))
    return None


