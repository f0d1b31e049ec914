"""What `generate` and `eval` run: a run dir, a checkpoint, a merged folder or any model, with its prompt format.

A run (or one of its checkpoints) is loaded as training loaded it: the recipe's base model, dtype, attention and
tokenizer, with the adapter on top, and its prompts are formatted with the recipe's data section. A merged folder
or any other model formats prompts with its tokenizer's chat template (a run's tokenizer files carry the template
it trained with, so a merged model needs nothing more; the Alpaca prompt's jinja twin is recognised and the Alpaca
prompt itself used), or the Alpaca prompt with ``--template alpaca``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from neftune_cli.data.sources import looks_like_path
from neftune_cli.data.templates import alpaca_jinja
from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.models.loading import load_base_model, load_tokenizer, named_weights_errors
from neftune_cli.recipe.load import saved_recipe, validate
from neftune_cli.recipe.schema import DataSection, ModelSection, Recipe
from neftune_cli.train.checkpoint import META_FILE, RunDir

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Target:
    name: str  # the default generator name in AlpacaEval outputs
    model: ModelSection  # what to load: the run's base, or the model itself
    data: DataSection  # how prompts are formatted (and, for a run, its training data)
    recipe: Recipe | None = None  # a run's recipe; None for a plain model
    adapter: Path | None = None  # a LoRA adapter to put on model
    loaded_tokenizer: object = None  # when resolve already loaded it

    def tokenizer(self):
        if self.loaded_tokenizer is None:
            self.loaded_tokenizer = load_tokenizer(self.model)
        return self.loaded_tokenizer

    def load(self, device: torch.device, *, merge: bool):
        """The model in eval mode. merge: fold the adapter in (faster decoding); eval keeps it apart, as training.
        A 4-bit base always keeps it apart: peft would merge into the dequantized weights and quantize them again,
        and answers would come from weights other than the ones trained."""
        model = load_base_model(self.model, device)
        if self.adapter is not None:
            from peft import PeftModel

            with named_weights_errors(str(self.adapter), "cannot load the adapter in"):
                model = PeftModel.from_pretrained(model, str(self.adapter))
            if merge and not self.model.quantization:
                model = model.merge_and_unload()
        return model.eval()


def inference_device(name: str = "auto") -> torch.device:
    """--device: auto is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is false)")
    return torch.device(name)


def resolve(spec: str, template: str | None = None) -> Target:
    """A run dir, a checkpoint folder, or a model (merged folder, hub id, builtin:...) as a Target."""
    path = Path(spec).expanduser()
    if (path / "recipe.yaml").is_file() or (path / META_FILE).is_file():
        if template is not None:
            raise UsageError(f"--template: {spec} is a training run; its prompts use the template it was trained "
                             "with (--template is for plain models)")
        return _run_target(path)
    if _missing_folder(spec):
        raise UsageError(f"{spec}: folder not found (expected a run dir, a checkpoint, a model folder, a hub id or "
                         "builtin:NAME)")
    model = ModelSection(name_or_path=spec)
    tokenizer = load_tokenizer(model)
    data = plain_data_section(template or ("alpaca" if _is_alpaca_twin(tokenizer) else "chat"))
    return Target(name=path.name or spec, model=model, data=data, loaded_tokenizer=tokenizer)


def _missing_folder(name: str) -> bool:
    """A local path that is not there; said so here, since the hub client would take it for a malformed repo id."""
    return looks_like_path(name) and not Path(name).expanduser().exists()


def _is_alpaca_twin(tokenizer) -> bool:
    """A model merged from a run trained with the Alpaca prompt carries its jinja twin as chat template. A chat
    message cannot hold an Alpaca record's separate input, so such a model gets the Alpaca prompt itself, as its
    run did; a record with an input then sees the "### Input:" prompt it was trained on."""
    return tokenizer.chat_template in (alpaca_jinja(with_bos=True), alpaca_jinja(with_bos=False))


def plain_data_section(template: str) -> DataSection:
    # prompt_ids needs a data section only for its template; the source is never read
    return DataSection(sources=[{"path": "unused"}], template=template)


def _run_target(path: Path) -> Target:
    if (path / META_FILE).is_file():  # a checkpoint: its meta.json holds the recipe
        where = path / META_FILE
        recipe = _recipe(json.loads(where.read_text())["recipe"], where)
        weights, name = path, f"{path.parent.parent.name}-{path.name}"
    else:
        where = path / "recipe.yaml"
        recipe = _recipe(yaml.safe_load(where.read_text(encoding="utf-8")), where)
        weights, name = path / "final", path.name
        if not weights.is_dir():
            latest = RunDir(path).latest_checkpoint()
            hint = f"; use its latest checkpoint: {latest}" if latest else " and no checkpoint yet"
            raise UsageError(f"{path} is a training run with no final/ (stopped early?){hint}")
    if (weights / ADAPTER_CONFIG).is_file():
        if _missing_folder(recipe.model.name_or_path):
            raise UsageError(f"{where}: model.name_or_path: folder not found: {recipe.model.name_or_path} (the base "
                             "model this run trained on; if it moved, write its new path there)")
        return Target(name, recipe.model, recipe.data, recipe, adapter=weights)
    if not (weights / "config.json").is_file():  # else transformers takes the folder for a hub id
        raise UsageError(f"{weights}: holds neither an adapter ({ADAPTER_CONFIG}) nor a model (config.json); the "
                         "run's weights are missing")
    # full fine-tuning: the weights are a whole model, loaded with the recipe's dtype and attention
    model = recipe.model.model_copy(update={"name_or_path": str(weights), "rope_scaling": None})
    return Target(name, model, recipe.data, recipe)


def _recipe(raw, where: Path) -> Recipe:
    try:
        return validate(saved_recipe(raw), str(where))
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
        raise UsageError(f"{where}: not a readable recipe ({first_line(e)})") from None
