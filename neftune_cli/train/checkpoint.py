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

import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from neftune_cli.io import faults
from neftune_cli.io.atomic import TMP_PREFIX, atomic_dir, atomic_file
from neftune_cli.io.console import log
from neftune_cli.io.errors import UsageError, first_line
from neftune_cli.io.outputs import RUN_MARKER, foreign_entries, manifest_files
from neftune_cli.train.metrics import METRICS_FILE
from neftune_cli.train.trackers import TENSORBOARD_DIR, TRACKERS_FILE

if TYPE_CHECKING:
    from neftune_cli.models.serving_files import TokenizerFiles

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
# Everything a run directory may hold at its top. --overwrite deletes only a folder holding nothing else, and
# below the top only what the manifests of final/ and each checkpoint list (io/outputs.py).
RUN_FILES = {RUN_MARKER, LOCK_FILE, "recipe.yaml", "data_report.json", METRICS_FILE, TRACKERS_FILE}
RUN_ENTRIES = RUN_FILES | {"checkpoints", "final", TENSORBOARD_DIR}
_EVENTS_PREFIX = "events.out.tfevents."  # the files TensorBoard's writer creates
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What final/ and a checkpoint held before folders carried a manifest (io/outputs.py): a run begun with an earlier
# version still resumes, is overwritten and pruned, and a file of the user's in it is still not ours.
_LEGACY_FILES = re.compile(
    r"README\.md|adapter_config\.json|adapter_model\.(safetensors|bin)|config\.json|generation_config\.json"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|chat_template\.(jinja|json)"
    r"|special_tokens_map\.json|tokenizer(_config)?\.json|tokenizer\.model|added_tokens\.json|vocab\.(json|txt)"
    r"|merges\.txt|" + re.escape(STATE_FILE) + "|" + re.escape(META_FILE))


def foreign_in_saved(folder: Path) -> list[str]:
    """What final/ or a checkpoint holds that we did not write: by its manifest, or by name in a folder written
    before manifests."""
    if manifest_files(folder) is not None or folder.is_symlink() or not folder.is_dir():
        return foreign_entries(folder)
    return [p.name for p in sorted(folder.iterdir())
            if p.is_symlink() or not p.is_file() or not _LEGACY_FILES.fullmatch(p.name)]


class RunDir:
    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.final = root / "final"

    @contextmanager
    def locked(self):
        """Hold the run directory for this process: a second `train` on it fails at once, naming the holder.

        The lock is an flock on output.dir/.lock, so it dies with its process (kill -9 included).
        """
        self._check_usable()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"output.dir {self.root}: cannot write there ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise UsageError(f"output.dir {self.root} is in use by {holder}; wait for it to finish or choose "
                                 "another output.dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"neftune train (pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the flock

    def _check_usable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"output.dir {self.root} is a file, not a folder; choose another output.dir")
        foreign = self._foreign_entries()
        if foreign:
            raise UsageError(
                f"output.dir {self.root} holds {foreign[0]!r}, which is not part of a neftune run; choose an empty "
                "or new output.dir (nothing in it was changed)"
            )

    def _foreign_entries(self) -> list[str]:
        """What a non-empty output.dir holds that a run did not write, at every depth (everything, if it has no
        run marker): all of it is checked before --overwrite deletes anything."""
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir())
        if names and RUN_MARKER not in names:
            return names
        foreign = []
        for name in names:
            path = self.root / name
            if name.startswith(TMP_PREFIX):
                continue  # debris of our own crashed writes, removed under the lock
            if name not in RUN_ENTRIES or path.is_symlink() or (name in RUN_FILES) == path.is_dir():
                foreign.append(name)
            elif name == "final":
                foreign += [f"final/{f}" for f in foreign_in_saved(path)]
            elif name == "checkpoints":
                for step in sorted(path.iterdir()):
                    if step.name.startswith(TMP_PREFIX):
                        continue
                    where = f"checkpoints/{step.name}"
                    if not _STEP_DIR.match(step.name) or step.is_symlink() or not step.is_dir():
                        foreign.append(where)
                    else:
                        foreign += [f"{where}/{f}" for f in foreign_in_saved(step)]
            elif name == TENSORBOARD_DIR:
                foreign += [f"{name}/{p.name}" for p in sorted(path.iterdir())
                            if not p.name.startswith(_EVENTS_PREFIX) or p.is_symlink() or not p.is_file()]
        return foreign

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Under the lock: clear what crashed writes left; unless resuming, start a new run here."""
        self._remove_debris()
        if resume:
            return
        if any((self.root / name).exists() for name in RUN_ENTRIES - {RUN_MARKER, LOCK_FILE}):
            if not overwrite:
                raise UsageError(f"output.dir {self.root} already holds a run; use --resume to continue it or "
                                 "--overwrite to delete it and start over")
            for name in RUN_ENTRIES - {LOCK_FILE}:
                path = self.root / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        with atomic_file(self.root / RUN_MARKER) as f:
            json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        return None

    def _remove_debris(self) -> None:
        """Temporary folders and files of a write that a crash (kill -9, power loss) interrupted: ours, and no
        other process is writing here (we hold the lock)."""
        debris = [p for folder in (self.root, self.checkpoints) if folder.is_dir()
                  for p in folder.glob(f"{TMP_PREFIX}*")]
        for path in debris:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if debris:
            log(f"removed {len(debris)} temporary file(s) left by an interrupted run: "
                f"{', '.join(p.name for p in debris[:3])}{' ...' if len(debris) > 3 else ''}")

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
            folder = self.checkpoints / f"step-{step}"
            if foreign := foreign_in_saved(folder):
                log(f"warning: kept {folder}: it holds {foreign[0]!r}, which neftune did not write")
                continue
            shutil.rmtree(folder, ignore_errors=True)



def save_final(run: RunDir, model, serving_files: TokenizerFiles, weights: dict | None = None) -> None:
    with atomic_dir(run.final) as tmp:
        save_model(model, tmp, weights)
        serving_files.write(tmp)


def save_model(model, folder: Path, state_dict: dict | None = None) -> None:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or a full HF model; `state_dict`: the whole
    weights when FSDP holds the model's in shards."""
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back (truncated, overwritten, from another version)."""


@dataclass
class Checkpoint:
    folder: Path
    weights: dict[str, torch.Tensor]
    state: dict  # optimizer, scheduler, rng, step
    meta: dict  # recipe, fingerprints, step

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read every file of a checkpoint into memory (nothing is applied yet), or raise CorruptCheckpoint."""
    from safetensors.torch import load_file

    def read(name: str, loader):
        try:
            return loader(folder / name)
        except Exception as e:  # noqa: BLE001 - safetensors, torch.load and json raise many types
            raise CorruptCheckpoint(f"{folder / name}: unreadable ({first_line(e)})") from None

    if (folder / "adapter_model.safetensors").exists():
        files = ["adapter_model.safetensors"]
    elif (folder / "model.safetensors.index.json").exists():
        index = read("model.safetensors.index.json", lambda p: json.loads(p.read_text()))
        files = sorted(set(index["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(read(name, load_file))
    state = read(STATE_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    meta = read(META_FILE, lambda p: json.loads(p.read_text()))
    if problem := _state_problem(state, weights):
        raise CorruptCheckpoint(f"{folder / STATE_FILE}: {problem}")
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict) or "step" not in meta:
        raise CorruptCheckpoint(f"{folder / META_FILE}: not the meta.json of a checkpoint")
    return Checkpoint(folder, weights, state, meta)


def _state_problem(state, weights: dict[str, torch.Tensor]) -> str | None:
    """What makes a trainer state unusable for these weights (damaged, or another run's), before the model is
    built: the optimizer's moments must be shaped like weights of this checkpoint."""
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
        return "not a trainer state (optimizer, scheduler, rng, step)"
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        return "the optimizer state is damaged"
    shapes = Counter(tuple(w.shape) for w in weights.values())
    moments = Counter(tuple(m["exp_avg"].shape) for m in optimizer["state"].values()
                      if isinstance(m, dict) and isinstance(m.get("exp_avg"), torch.Tensor))
    if moments - shapes:
        return "the optimizer state does not fit this checkpoint's weights (from another run?)"
    return None


def latest_intact_checkpoint(run: RunDir) -> Checkpoint:
    """The newest checkpoint that reads back whole; a damaged one is named and skipped (never deleted)."""
    steps = run.checkpoint_steps()
    if not steps:
        raise UsageError(f"--resume: no checkpoint in {run.checkpoints} to resume from")
    for step in reversed(steps):
        try:
            return read_checkpoint(run.checkpoints / f"step-{step}")
        except CorruptCheckpoint as e:
            log(f"warning: {e}; trying the checkpoint before it")
    raise UsageError(f"--resume: no intact checkpoint in {run.checkpoints} (all {len(steps)} are damaged)")


def load_weights(model, checkpoint: Checkpoint) -> None:
    """Put a checkpoint's weights (saved by save_model) into the same freshly built model, exactly."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, checkpoint.weights)
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"{checkpoint.folder}: adapter does not fit the model: {result.unexpected_keys[0]}")
        return
    missing, unexpected = model.load_state_dict(checkpoint.weights, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise UsageError(f"{checkpoint.folder}: weights do not fit the model ({(unexpected or missing)[0]})")


def save_checkpoint(
    run: RunDir, step: int, model, trainer_state: dict, meta: dict, keep_last: int, serving_files: TokenizerFiles,
    weights: dict | None = None,
) -> Path:
    target = run.checkpoints / f"step-{step}"
    with atomic_dir(target) as tmp:
        save_model(model, tmp, weights)
        serving_files.write(tmp)  # a checkpoint serves (or merges) like final/
        faults.checkpoint(f"checkpoint-write-{step}")
        torch.save(trainer_state, tmp / STATE_FILE)
        # meta.json last: a folder without it is not a checkpoint (see checkpoint_steps)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    run.prune(keep_last)
    return target
