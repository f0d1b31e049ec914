"""The training recipe, top to bottom: data, model, optimizer, the loop, checkpoints, the summary.

One optimizer step = `grad_accum` micro-batches. The loss of a step is the sum of the token losses over all of
its micro-batches divided by the number of trained tokens in all of them, so every trained token weighs the same
whatever the batching (a mean of per-micro-batch means would overweight short micro-batches).
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from neftune_cli import __version__
from neftune_cli.atomic import atomic_dir, atomic_file
from neftune_cli.batching import IGNORE, batch_builder, plan_epoch
from neftune_cli.checkpoint import (
    Checkpoint,
    RunDir,
    latest_intact_checkpoint,
    load_weights,
    save_checkpoint,
    save_model,
)
from neftune_cli.console import log, out, stdout_is_tty
from neftune_cli.data import PreparedData, prepare
from neftune_cli.errors import EXIT_SIGINT, EXIT_SIGTERM, OOM_HINT, Interrupted, RuntimeFailure, UsageError
from neftune_cli.loss import CausalLMLoss, attention_stays_within_examples
from neftune_cli.modeling import load_model, load_tokenizer, model_path
from neftune_cli.progress import Progress
from neftune_cli.recipe import LoadedRecipe, Recipe, recipe_to_yaml
from neftune_cli.tokenizer_files import TokenizerFiles, tokenizer_files

# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_last")


@dataclass
class Schedule:
    """How the recipe's epochs become optimizer steps."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, recipe: Recipe, n_examples: int) -> Schedule:
        t = recipe.train
        micro = math.ceil(n_examples / t.micro_batch_size)
        per_epoch = math.ceil(micro / t.grad_accum)
        total = t.max_steps or t.epochs * per_epoch
        return cls(micro, per_epoch, total, math.ceil(t.warmup_ratio * total))

    def lr_factor(self, kind: str, step: int) -> float:
        """LR multiplier before optimizer step `step` (0-based), as transformers' schedulers define it."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0


def run_training(loaded: LoadedRecipe, *, resume: bool = False, overwrite: bool = False, force: bool = False,
                 resume_command: str = "neftune train RECIPE --resume") -> dict:
    """Train as the recipe says, holding output.dir for the whole run. Returns the final summary (also printed)."""
    with RunDir(Path(loaded.recipe.output.dir)).locked() as run:
        run.prepare(resume=resume, overwrite=overwrite)
        resume_from = latest_intact_checkpoint(run) if resume else None
        return _train(loaded, run, resume_from, force=force, resume_command=resume_command)


def _train(loaded: LoadedRecipe, run: RunDir, resume_from: Checkpoint | None, *, force: bool,
           resume_command: str) -> dict:
    recipe = loaded.recipe
    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(t.seed)
    for warning in loaded.warnings():
        log(f"warning: {warning}")

    # --- data ---
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer, log=log)
    hand_on = tokenizer_files(model_path(recipe.model), recipe.data, tokenizer)  # with every saved model
    log(f"data: {data.report.summary()}")
    if resume_from is not None:
        check_resumable(resume_from, recipe, data, force)
    lengths = data.train["length"]
    schedule = Schedule.of(recipe, len(lengths))
    if resume_from is not None and resume_from.step >= schedule.total_steps and run.final.is_dir():
        out.print(f"nothing to do: {run.root} finished at step {resume_from.step} and final/ is in place",
                  markup=False)
        return {"steps": resume_from.step, "final": str(run.final)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    batch_of = batch_builder(t.batching, pad_id, device)

    # --- model and optimizer ---
    model = load_model(recipe, device)
    trainer = CausalLMLoss(model, recipe.neftune.alpha, recipe.neftune.scale)
    if t.batching == "pack" and not attention_stays_within_examples(trainer):
        raise UsageError(f"train.batching: pack needs attention that stays within each packed example, and "
                         f"{recipe.model.name_or_path} with attn_implementation {recipe.model.attn_implementation} "
                         f"lets examples see each other; use batching: pad or attn_implementation: flash_attention_2")
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model: {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trained "
        f"({recipe.finetune}), {next(model.parameters()).dtype}, {device}")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.lr_factor(t.schedule, s))
    noise_generator = torch.Generator(device=device).manual_seed(t.seed + 1)

    start_step = 0
    if resume_from is not None:
        load_weights(model, resume_from)
        state = resume_from.state
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], noise_generator)
        start_step = state["step"]
        run.truncate_metrics(start_step)
        log(f"resume: from {resume_from.folder} (step {start_step} of {schedule.total_steps})")
    else:
        with atomic_file(run.root / "recipe.yaml") as f:
            f.write(recipe_to_yaml(recipe))
        with atomic_file(run.root / "data_report.json") as f:
            json.dump(data.report.to_dict(), f, indent=2)
    log(f"train: {schedule.total_steps} steps of {t.grad_accum} x {t.micro_batch_size} examples "
        f"({t.batching}), {len(lengths)} examples, noise alpha {recipe.neftune.alpha or 0} ({recipe.neftune.scale})")

    meta = {"recipe": recipe.model_dump(mode="json"), "data_fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer_fingerprint, "version": __version__}

    def checkpoint(step: int) -> Path:
        if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            raise RuntimeFailure(f"the weights hold NaN/inf after step {step}; not saving them. Last good checkpoint: "
                                 f"{run.latest_checkpoint() or 'none'}. Try a lower train.lr")
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(noise_generator), "step": step}
        return save_checkpoint(run, step, model, state, {**meta, "step": step}, t.keep_last, hand_on)

    @functools.lru_cache(maxsize=1)
    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_epoch(lengths, t.micro_batch_size, seed=t.seed, epoch=epoch, group_by_length=t.batching == "pad")

    def micro_batches(step: int) -> list[list[int]]:
        """Example indices of the micro-batches of optimizer step `step` (1-based)."""
        epoch, k = divmod(step - 1, schedule.steps_per_epoch)
        return epoch_plan(epoch)[k * t.grad_accum:(k + 1) * t.grad_accum]

    # --- the loop ---
    metrics_file = run.metrics.open("a", encoding="utf-8")
    progress = Progress(schedule.total_steps, start_step, enabled=stdout_is_tty())

    def run_eval(step: int) -> float:
        eval_loss = evaluate(trainer, data.eval, batch_of, t.micro_batch_size)
        write_metrics(metrics_file, {"step": step, "eval_loss": eval_loss})
        progress.print(f"step {step}: eval_loss {eval_loss:.4f}")
        return eval_loss

    started = window_start = time.perf_counter()
    window_tokens = 0
    last = {}
    step = start_step
    try:
        with stop_on_signals() as stop, progress:
            if data.eval is not None and start_step == 0:  # the baseline the run is judged against
                run_eval(0)
            model.train()
            while step < schedule.total_steps:
                step += 1
                step_started = time.perf_counter()
                batches = [batch_of(data.train, mb) for mb in micro_batches(step)]
                n_trained = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
                n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                               for b in batches)
                loss_sum, norms = 0.0, []
                for b in batches:
                    loss, _, noise = trainer(**b, generator=noise_generator)
                    (loss / max(n_trained, 1)).backward()
                    loss_sum = loss_sum + loss.detach()  # a tensor: no device sync per micro-batch
                    if noise is not None:
                        norms.append(noise)
                step_loss = float(loss_sum) / max(n_trained, 1)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")))
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
                    raise RuntimeFailure(
                        f"{what} at step {step}; stopped before updating the weights. Last good checkpoint: "
                        f"{run.latest_checkpoint() or 'none'}. Try a lower train.lr or train.max_grad_norm")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window_tokens += n_tokens

                now = time.perf_counter()
                last = {"step": step, "epoch": round(step / schedule.steps_per_epoch, 4),
                        "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                        "trained_tokens": n_trained,
                        "noise_norm": float(torch.cat(norms).mean()) if norms else 0.0}
                progress.update(step, last, n_tokens / max(now - step_started, 1e-9))
                if step % t.log_every == 0 or step == schedule.total_steps:
                    record = {**last, "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                              "elapsed_s": now - started}
                    write_metrics(metrics_file, record)
                    progress.log(format_record(record))
                    window_start, window_tokens = now, 0
                if data.eval is not None and ((t.eval_every and step % t.eval_every == 0)
                                              or step == schedule.total_steps):
                    last["eval_loss"] = run_eval(step)
                if (t.save_every and step % t.save_every == 0) or step == schedule.total_steps:
                    checkpoint(step)
                if stop.signum is not None and step < schedule.total_steps:
                    where = checkpoint(step)
                    code = EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
                    raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} after step {step}; "
                                      f"checkpoint {where}. Resume with: {resume_command}", code)
    except torch.cuda.OutOfMemoryError:
        raise RuntimeFailure(f"CUDA out of memory - {OOM_HINT}") from None
    finally:
        metrics_file.close()

    save_final(run, model, hand_on)
    summary = {"steps": step, "elapsed_s": round(time.perf_counter() - started, 1),
               "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"), "final": str(run.final)}
    out.print(f"done: {step} steps in {summary['elapsed_s']}s, final loss {fmt(summary['final_loss'])}, "
              f"eval loss {fmt(summary['eval_loss'])}; {'adapter' if recipe.finetune == 'lora' else 'model'} "
              f"in {run.final}", markup=False)
    if recipe.finetune == "lora":
        out.print(f"next: neftune merge {run.root} --out merged/{run.root.name}", markup=False)
    return summary


def evaluate(trainer: CausalLMLoss, dataset, batch_of, batch_size: int) -> float:
    """Mean token loss over the eval set: eval mode (no dropout, no noise), no gradients."""
    trainer.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            loss, n, _ = trainer(**batch_of(dataset, indices))
            total, count = total + loss.item(), count + n
    trainer.train()
    return total / max(count, 1)


def save_final(run: RunDir, model, hand_on: TokenizerFiles) -> None:
    with atomic_dir(run.final) as tmp:
        save_model(model, tmp)
        hand_on.write(tmp)


def check_resumable(checkpoint: Checkpoint, recipe: Recipe, data: PreparedData, force: bool) -> None:
    meta = checkpoint.meta
    changes = []
    before, now = flatten(meta["recipe"]), flatten(recipe.model_dump(mode="json"))
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


class _Stop:
    signum: int | None = None


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves and exits. A second SIGINT stops at once."""
    stop = _Stop()

    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def write_metrics(file, record: dict) -> None:
    """One strict-JSON line: a non-finite number (which JSON has no word for) is written as null."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    file.write(json.dumps(record, allow_nan=False) + "\n")
    file.flush()


def format_record(r: dict) -> str:
    return (f"step {r['step']} epoch {r['epoch']:.2f} loss {r['loss']:.4f} lr {r['lr']:.2e} "
            f"grad_norm {r['grad_norm']:.3f} noise_norm {r['noise_norm']:.3f} tokens/s {r['tokens_per_s']:.0f}")


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
