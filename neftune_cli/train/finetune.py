"""The training recipe, top to bottom: data, model, optimizer, the loop, checkpoints, the summary.

One optimizer step = `grad_accum` micro-batches. The loss of a step is the sum of the token losses over all of
its micro-batches divided by the number of trained tokens in all of them, so every trained token weighs the same
whatever the batching (a mean of per-micro-batch means would overweight short micro-batches).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from neftune_cli import __version__
from neftune_cli.data import PreparedData, prepare
from neftune_cli.data.batching import StepPlan, batch_builder
from neftune_cli.io import faults
from neftune_cli.io.atomic import atomic_dir, atomic_file
from neftune_cli.io.console import log, out, stdout_is_tty
from neftune_cli.io.errors import EXIT_SIGINT, EXIT_SIGTERM, OOM_HINT, Interrupted, RuntimeFailure, UsageError
from neftune_cli.models.loading import load_model, load_tokenizer, model_path
from neftune_cli.models.serving_files import TokenizerFiles, tokenizer_files
from neftune_cli.recipe.schema import LoadedRecipe, Recipe, recipe_to_yaml
from neftune_cli.train import parallel
from neftune_cli.train.checkpoint import (
    Checkpoint,
    RunDir,
    latest_intact_checkpoint,
    load_weights,
    save_checkpoint,
    save_model,
)
from neftune_cli.train.flops import flops_per_token, numel, peak_flops
from neftune_cli.train.metrics import MetricsLog, summary_writer_class
from neftune_cli.train.progress import Progress
from neftune_cli.train.step import CausalLMLoss, attention_stays_within_examples

# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.report_to")


@dataclass
class Schedule:
    """The learning rate over the run's optimizer steps."""

    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, recipe: Recipe, plan: StepPlan) -> Schedule:
        t = recipe.train
        total = t.max_steps or plan.total_steps(t.epochs)
        return cls(total, math.ceil(t.warmup_ratio * total))

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
    """Train as the recipe says, holding output.dir for the whole run (rank 0 holds it under torchrun).
    Returns the final summary (also printed)."""
    if "tensorboard" in loaded.recipe.train.report_to:
        summary_writer_class()  # a missing extra fails now, not after tokenizing and loading the model
    d = parallel.init(loaded.recipe.train.distributed)
    run = RunDir(Path(loaded.recipe.output.dir))
    try:
        if loaded.recipe.model.attn_implementation == "flex_attention" and d.device.type != "cuda":
            raise UsageError("model.attn_implementation: flex_attention trains on CUDA only (PyTorch has no "
                             "FlexAttention backward on a CPU); use sdpa")
        with run.locked() if d.main else nullcontext():
            with parallel.main_first(d):  # the others read what rank 0 cleaned up and tokenized
                if d.main:
                    run.prepare(resume=resume, overwrite=overwrite)
                resume_from = latest_intact_checkpoint(run) if resume else None
                tokenizer = load_tokenizer(loaded.recipe.model)
                data = prepare(loaded.recipe, tokenizer, log=log)
            return _train(loaded, run, d, tokenizer, data, resume_from, force=force, resume_command=resume_command)
    finally:
        parallel.shutdown(d)


def _train(loaded: LoadedRecipe, run: RunDir, d: parallel.Dist, tokenizer, data: PreparedData,
           resume_from: Checkpoint | None, *, force: bool, resume_command: str) -> dict:
    recipe = loaded.recipe
    t = recipe.train
    device = d.device
    parallel.check_batch(t.grad_accum, t.micro_batch_size, d)
    seed_everything(t.seed)  # the same initial weights (LoRA's A) on every rank: FSDP does not broadcast them
    for warning in loaded.warnings():
        log(f"warning: {warning}")

    # --- data ---
    hand_on = tokenizer_files(model_path(recipe.model), recipe.data, tokenizer)  # with every saved model
    log(f"data: {data.report.summary()}")
    if resume_from is not None:
        check_resumable(resume_from, recipe, data, force, d)
    lengths = data.train["length"]
    plan = StepPlan(lengths, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                    group_by_length=t.batching == "pad", token_budget=t.pack_tokens)
    schedule = Schedule.of(recipe, plan)
    if resume_from is not None and resume_from.step >= schedule.total_steps and run.final.is_dir():
        out.print(f"nothing to do: {run.root} finished at step {resume_from.step} and final/ is in place",
                  markup=False)
        return {"steps": resume_from.step, "final": str(run.final)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    batch_of = batch_builder(t.batching, pad_id, device)

    # --- model and optimizer ---
    model = load_model(recipe, device)
    if resume_from is not None:
        load_weights(model, resume_from)  # before FSDP shards the parameters
    trainer = CausalLMLoss(model, recipe.neftune.alpha, recipe.neftune.scale)
    if t.batching == "pack" and not attention_stays_within_examples(trainer):
        raise UsageError(f"train.batching: pack needs attention that stays within each packed example, and "
                         f"{recipe.model.name_or_path} with attn_implementation {recipe.model.attn_implementation} "
                         f"lets examples see each other; use batching: pad, or attn_implementation: "
                         f"flash_attention_2 or flex_attention")
    peak = peak_flops(device)
    token_flops = flops_per_token(model, sum(lengths) / max(len(lengths), 1)) if peak else None
    step_forward = parallel.wrap(trainer, d)
    if d.rank:
        seed_everything(t.seed + d.rank)  # from here each rank its own dropout stream
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(numel(p) for p in params), sum(numel(p) for p in model.parameters())
    log(f"model: {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trained "
        f"({recipe.finetune}), {next(model.parameters()).dtype}, {device}")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.lr_factor(t.schedule, s))
    noise_generator = torch.Generator(device=device).manual_seed(t.seed + 1 + d.rank)

    start_step = 0
    if resume_from is not None:
        state = resume_from.state
        parallel.load_optimizer_state(step_forward, optimizer, state["optimizer"], d)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"][d.rank], noise_generator)
        start_step = state["step"]
        log(f"resume: from {resume_from.folder} (step {start_step} of {schedule.total_steps})")
    elif d.main:
        with atomic_file(run.root / "recipe.yaml") as f:
            f.write(recipe_to_yaml(recipe))
        with atomic_file(run.root / "data_report.json") as f:
            json.dump(data.report.to_dict(), f, indent=2)
    processes = f" on each of {d.world} processes ({d.mode})" if d.enabled else ""
    log(f"train: {schedule.total_steps} steps of {t.grad_accum // d.world} x {t.micro_batch_size} examples"
        f"{processes} ({t.batching}), {len(lengths)} examples, noise alpha {recipe.neftune.alpha or 0} "
        f"({recipe.neftune.scale})")

    meta = {"recipe": recipe.model_dump(mode="json"), "data_fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer_fingerprint, "version": __version__, "world_size": d.world}

    def checkpoint(step: int) -> Path:
        """Every rank takes part (gathers); rank 0 writes."""
        local_bad = int((~torch.stack([local(p.detach()).isfinite().all() for p in params])).sum())  # one sync
        if parallel.sum_all([local_bad], d)[0]:
            raise RuntimeFailure(f"the weights hold NaN/inf after step {step}; not saving them. Last good checkpoint: "
                                 f"{run.latest_checkpoint() or 'none'}. Try a lower train.lr")
        weights = parallel.full_model_state(model, d)
        state = {"optimizer": parallel.optimizer_state(step_forward, optimizer, d),
                 "scheduler": scheduler.state_dict(), "rng": parallel.gather_object(rng_state(noise_generator), d),
                 "step": step}
        where = run.checkpoints / f"step-{step}"
        if d.main:
            where = save_checkpoint(run, step, model, state, {**meta, "step": step}, t.keep_last, hand_on, weights)
        parallel.barrier(d)
        return where

    def micro_batches(step: int) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of optimizer step `step` (1-based) with their weight in the loss: 0 for a
        stand-in where this rank's share of the step comes up short (it must still run forward and backward)."""
        step_plan = plan.micro_batches(step)
        return [(mb, 1.0) if mb is not None else (step_plan[0], 0.0)
                for mb in parallel.my_share(step_plan, d, pad=True)]

    # --- the loop ---
    metrics_log = MetricsLog(run.root, t.report_to, start_step) if d.main else None
    progress = Progress(schedule.total_steps, start_step, enabled=stdout_is_tty() and d.main)

    def run_eval(step: int) -> float:
        eval_loss = evaluate(step_forward, data.eval, batch_of, t.micro_batch_size, d)
        write_metrics(metrics_log, {"step": step, "eval_loss": eval_loss})
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
                faults.crash_point(f"step-{step}")
                step_started = time.perf_counter()
                shares = micro_batches(step)
                batches = [(batch_of(data.train, mb), weight) for mb, weight in shares]
                n_trained, n_tokens = parallel.sum_all(
                    [sum(b.trained for b, w in batches if w), sum(b.tokens for b, w in batches if w)], d)
                loss_sum, norms = 0.0, []
                for i, (b, weight) in enumerate(batches):
                    with parallel.grad_sync(step_forward, d, last=i == len(batches) - 1):
                        loss, _, noise = step_forward(**b, generator=noise_generator)
                        # DDP/FSDP average gradients over the ranks; every trained token of the step weighs the same
                        (loss * weight * d.world / max(n_trained, 1)).backward()
                    loss_sum = loss_sum + loss.detach() * weight  # a tensor: no device sync per micro-batch
                    if noise is not None and weight:
                        norms.append(noise)
                noise_local = torch.cat(norms) if norms else torch.zeros(0)
                loss_total, noise_total, noise_count = parallel.sum_all(
                    [float(loss_sum), float(noise_local.sum()), noise_local.numel()], d)
                step_loss = loss_total / max(n_trained, 1)
                grad_norm = float(local(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))))
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
                last = {"step": step, "epoch": round(plan.epochs_done(step), 4),
                        "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens),
                        "trained_tokens": int(n_trained), "noise_norm": noise_total / max(noise_count, 1)}
                progress.update(step, last, n_tokens / max(now - step_started, 1e-9))
                if step % t.log_every == 0 or step == schedule.total_steps:
                    record = {**last, "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                              "elapsed_s": now - started}
                    if d.enabled:
                        record["tokens_per_s_per_process"] = record["tokens_per_s"] / d.world
                    if token_flops:  # CUDA, on a device whose peak we know
                        record["mfu"] = record["tokens_per_s"] / d.world * token_flops / peak
                    write_metrics(metrics_log, record)
                    progress.log(format_record(record))
                    window_start, window_tokens = now, 0
                if data.eval is not None and ((t.eval_every and step % t.eval_every == 0)
                                              or step == schedule.total_steps):
                    last["eval_loss"] = run_eval(step)
                saved = None
                if (t.save_every and step % t.save_every == 0) or step == schedule.total_steps:
                    saved = checkpoint(step)
                stopping = parallel.sum_all([stop.signum is not None], d)[0]  # any rank's signal stops all
                if stopping and step < schedule.total_steps:
                    where = saved or checkpoint(step)  # not twice when the signal came on a save step
                    signum = stop.signum or signal.SIGTERM
                    code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
                    raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {step}; "
                                      f"checkpoint {where}. Resume with: {resume_command}", code)
    except torch.cuda.OutOfMemoryError:
        raise RuntimeFailure(f"CUDA out of memory - {OOM_HINT}") from None
    finally:
        if metrics_log is not None:
            metrics_log.close()

    weights = parallel.full_model_state(model, d)
    if d.main:
        save_final(run, model, hand_on, weights)
    parallel.barrier(d)
    summary = {"steps": step, "elapsed_s": round(time.perf_counter() - started, 1),
               "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"), "final": str(run.final)}
    out.print(f"done: {step} steps in {summary['elapsed_s']}s, final loss {fmt(summary['final_loss'])}, "
              f"eval loss {fmt(summary['eval_loss'])}; {'adapter' if recipe.finetune == 'lora' else 'model'} "
              f"in {run.final}", markup=False)
    if recipe.finetune == "lora":
        out.print(f"next: neftune merge {run.root} --out merged/{run.root.name}", markup=False)
    return summary


def evaluate(trainer: CausalLMLoss, dataset, batch_of, batch_size: int, d: parallel.Dist = parallel.SINGLE
             ) -> float:
    """Mean token loss over the eval set: eval mode (no dropout, no noise), no gradients; ranks share the batches."""
    trainer.train(False)
    total, count = 0.0, 0
    # FSDP: every rank runs every forward (they gather the shards together), a stand-in where its share is short
    starts = parallel.my_share(list(range(0, len(dataset), batch_size)), d, pad=d.fsdp)
    with torch.no_grad():
        for start in starts:
            indices = list(range(start or 0, min((start or 0) + batch_size, len(dataset))))
            loss, n, _ = trainer(**batch_of(dataset, indices))
            if start is not None:
                total, count = total + loss.item(), count + n
    trainer.train(True)
    total, count = parallel.sum_all([total, count], d)
    return total / max(count, 1)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local part of a tensor FSDP shards (a DTensor); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def save_final(run: RunDir, model, hand_on: TokenizerFiles, weights: dict | None = None) -> None:
    with atomic_dir(run.final) as tmp:
        save_model(model, tmp, weights)
        hand_on.write(tmp)


def check_resumable(checkpoint: Checkpoint, recipe: Recipe, data: PreparedData, force: bool,
                    d: parallel.Dist = parallel.SINGLE) -> None:
    meta = checkpoint.meta
    written_by = meta.get("world_size", 1)
    if written_by != d.world:  # each process's noise, dropout and data position belong to that process
        raise UsageError(f"--resume: {checkpoint.folder} was written by {written_by} process(es); resume with the "
                         f"same number (this run has {d.world})")
    changes = []
    before, now = flatten(with_defaults(meta["recipe"])), flatten(recipe.model_dump(mode="json"))
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


def with_defaults(saved: dict) -> dict:
    """A recipe saved by an earlier version, with the keys added since at their defaults (which is how it ran)."""
    try:
        return Recipe.model_validate(saved).model_dump(mode="json")
    except ValueError:  # a key since removed or renamed: compare as saved, and the change is named
        return saved


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


def write_metrics(log: MetricsLog | None, record: dict) -> None:
    """Not rank 0: no log."""
    if log is not None:
        log.write(record)


def format_record(r: dict) -> str:
    return (f"step {r['step']} epoch {r['epoch']:.2f} loss {r['loss']:.4f} lr {r['lr']:.2e} "
            f"grad_norm {r['grad_norm']:.3f} noise_norm {r['noise_norm']:.3f} tokens/s {r['tokens_per_s']:.0f}"
            + (f" mfu {r['mfu']:.1%}" if "mfu" in r else ""))


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
