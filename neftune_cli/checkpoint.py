"""The run directory: atomic checkpoints, the latest one to resume from, and the final adapter.

Layout of output.dir:
  recipe.yaml          the resolved recipe
  data_report.json     what the data step kept, dropped and truncated
  metrics.jsonl        one JSON object per logged step / eval
  checkpoints/step-N/  adapter (PEFT format) or full model, trainer_state.pt, meta.json
  final/               adapter + tokenizer (or full model + tokenizer)
Every folder is written under a temporary name and renamed into place, so a crash leaves either the old state
or the new one, never half of one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from neftune_cli.atomic import atomic_dir, atomic_file
from neftune_cli.errors import UsageError

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDir:
    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.metrics = root / "metrics.jsonl"
        self.final = root / "final"

    def prepare(self, *, resume: bool, overwrite: bool) -> Path | None:
        """Create the run dir; return the checkpoint to resume from, if resuming."""
        exists = self.root.exists() and any(self.root.iterdir())
        if resume:
            latest = self.latest_checkpoint()
            if latest is None:
                raise UsageError(f"--resume: no checkpoint in {self.checkpoints} to resume from")
            return latest
        if exists and not overwrite:
            raise UsageError(
                f"output.dir {self.root} already holds a run; use --resume to continue it or --overwrite to start over"
            )
        if exists:
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        return None

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for d in self.checkpoints.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / META_FILE).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoints / f"step-{steps[-1]}" if steps else None

    def prune(self, keep_last: int) -> None:
        for step in self.checkpoint_steps()[:-keep_last]:
            shutil.rmtree(self.checkpoints / f"step-{step}", ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step`: the resumed run writes them again."""
        if not self.metrics.exists():
            return
        keep = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_file(self.metrics) as f:
            f.write("".join(line + "\n" for line in keep))


def save_model(model, folder: Path) -> None:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or a full HF model."""
    model.save_pretrained(folder, safe_serialization=True)


def load_model_weights(model, folder: Path) -> None:
    """Load weights saved by save_model back into the same (freshly built) model, exactly."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"{folder}: adapter does not fit the model: {result.unexpected_keys[0]}")
        return
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(folder / name))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise UsageError(f"{folder}: weights do not fit the model ({(unexpected or missing)[0]})")


def save_checkpoint(run: RunDir, step: int, model, trainer_state: dict, meta: dict, keep_last: int) -> Path:
    target = run.checkpoints / f"step-{step}"
    with atomic_dir(target) as tmp:
        save_model(model, tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        # meta.json last: a folder without it is not a checkpoint (see checkpoint_steps)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    run.prune(keep_last)
    return target


def load_checkpoint(folder: Path, model) -> tuple[dict, dict]:
    """Load weights into `model`; return (trainer_state, meta)."""
    load_model_weights(model, folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((folder / META_FILE).read_text())
    return state, meta
