"""The fine-tuning recipe, read top to bottom: `FineTune.run` sets up the data, the model and the optimizer, then
`train` runs the loop, checkpoints and the final save.

One optimizer step = `grad_accum` micro-batches. The loss of a step is the sum of the token losses over all of
its micro-batches divided by the number of trained tokens in all of them, so every trained token weighs the same
whatever the batching (a mean of per-micro-batch means would overweight short micro-batches).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from neftune_cli import __version__
from neftune_cli.data.batching import StepPlan, batch_builder
from neftune_cli.data.pipeline import PreparedData, prepare
from neftune_cli.io import faults
from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.console import log, out, stdout_is_tty
from neftune_cli.io.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    OOM_HINT,
    Interrupted,
    RuntimeFailure,
    UsageError,
    first_line,
)
from neftune_cli.models.loading import (
    check_against_config,
    load_config,
    load_model,
    load_tokenizer,
    model_path,
    param_lora_summary,
    resolve_dtype,
)
from neftune_cli.models.serving_files import tokenizer_files
from neftune_cli.recipe.load import LoadedRecipe, recipe_to_yaml
from neftune_cli.train import parallel
from neftune_cli.train.checkpoint import (
    STATE_FILE,
    Checkpoint,
    RunDir,
    latest_intact_checkpoint,
    load_weights,
    save_checkpoint,
    save_final,
)
from neftune_cli.train.flops import flops_per_token, numel, peak_flops, peak_memory_gb
from neftune_cli.train.metrics import MetricsLog, log_line
from neftune_cli.train.precision import Precision
from neftune_cli.train.progress import Progress
from neftune_cli.train.resume import check_resumable, folder_identity, restore_rng, rng_state, seed_everything
from neftune_cli.train.schedule import Schedule
from neftune_cli.train.signals import StopRequest, stop_on_signals
from neftune_cli.train.step import (
    CausalLMLoss,
    attention_stays_within_examples,
    check_forward,
    evaluate,
    first_layer_gain,
)
from neftune_cli.train.trackers import require_trackers


def run_training(loaded: LoadedRecipe, *, resume: bool = False, overwrite: bool = False, force: bool = False,
                 resume_command: str = "neftune train RECIPE --resume") -> dict:
    """Train as the recipe says, holding output.dir for the whole run (rank 0 holds it under torchrun).
    Returns the final summary (also printed)."""
    require_trackers(loaded.recipe)  # a missing extra or server fails now, not after tokenizing and loading the model
    # auto becomes the kernel the model supports before anything is recorded: a run's recipe names what it ran
    loaded.recipe.model.attn_implementation = check_against_config(loaded.recipe, load_config(loaded.recipe.model))
    dist = parallel.init(loaded.recipe.train.distributed)
    run = RunDir(Path(loaded.recipe.output.dir))
    try:
        if loaded.recipe.model.attn_implementation == "flex_attention" and dist.device.type != "cuda":
            raise UsageError("model.attn_implementation: flex_attention trains on CUDA only (PyTorch has no "
                             "FlexAttention backward on a CPU); use sdpa")
        with run.locked() if dist.main else nullcontext():
            with parallel.main_first(dist):  # the others read what rank 0 cleaned up and tokenized
                if dist.main:
                    run.prepare(resume=resume, overwrite=overwrite)
                resume_from = latest_intact_checkpoint(run) if resume else None
                tokenizer = load_tokenizer(loaded.recipe.model)
                data = prepare(loaded.recipe, tokenizer, log=log)
            return FineTune(loaded, run, dist, tokenizer, data, resume_from, force=force,
                            resume_command=resume_command).run()
    finally:
        parallel.shutdown(dist)


class FineTune:
    """One run of the recipe on this process: `run` = setup_data, setup_model, setup_optimizer, train."""

    def __init__(self, loaded: LoadedRecipe, run: RunDir, dist: parallel.Dist, tokenizer, data: PreparedData,
                 resume_from: Checkpoint | None, *, force: bool, resume_command: str):
        self.loaded, self.recipe, self.cfg = loaded, loaded.recipe, loaded.recipe.train
        self.run_dir, self.dist, self.tokenizer, self.data = run, dist, tokenizer, data
        self.resume_from, self.force, self.resume_command = resume_from, force, resume_command

    def run(self) -> dict:
        parallel.check_batch(self.cfg.grad_accum, self.cfg.micro_batch_size, self.dist)
        seed_everything(self.cfg.seed)  # the same initial weights (LoRA's A) on every rank, as one process gets
        for warning in self.loaded.warnings():
            log(f"warning: {warning}")
        self.setup_data()
        if self.already_finished():
            out.print(f"nothing to do: {self.run_dir.root} finished at step {self.resume_from.step} and final/ is "
                      "in place", markup=False)
            return {"steps": self.resume_from.step, "final": str(self.run_dir.final)}
        self.setup_model()
        self.setup_optimizer()
        self.start_step = self.restore() if self.resume_from is not None else self.record_setup()
        processes = f" on each of {self.dist.world} processes ({self.dist.mode})" if self.dist.enabled else ""
        log(f"train: {self.schedule.total_steps} steps of {self.cfg.grad_accum // self.dist.world} x "
            f"{self.cfg.micro_batch_size} examples{processes} ({self.cfg.batching}), {len(self.lengths)} examples, "
            f"noise alpha {self.recipe.neftune.alpha or 0} ({self.recipe.neftune.scale})")
        return self.train()

    # --- setup -------------------------------------------------------------------------------------------

    def setup_data(self) -> None:
        cfg, data = self.cfg, self.data
        self.serving_files = tokenizer_files(model_path(self.recipe.model), self.recipe.data, self.tokenizer)
        log(f"data: {data.report.summary()}")
        if self.resume_from is not None:
            self.forced_changes = check_resumable(self.resume_from, self.recipe, data, self.force, self.dist)
        self.lengths = data.train["length"]
        self.plan = StepPlan(self.lengths, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                             seed=cfg.seed, group_by_length=cfg.batching == "pad", token_budget=cfg.pack_tokens)
        self.schedule = Schedule.of(cfg, self.plan)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batch_of = batch_builder(cfg.batching, pad_id, self.dist.device)

    def already_finished(self) -> bool:
        return (self.resume_from is not None and self.resume_from.step >= self.schedule.total_steps
                and self.run_dir.final.is_dir())

    def setup_model(self) -> None:
        recipe, device, dist = self.recipe, self.dist.device, self.dist
        self.precision = Precision.of(resolve_dtype(recipe.model.dtype, device), self.cfg.precision)
        if (warning := self.precision.warning(recipe.finetune)) is not None:
            log(f"warning: {warning}")
        # FSDP: every rank builds the model without weights and shards it; rank 0 alone loads them, into host memory
        source = self.loaded_model(torch.device("cpu")) if dist.fsdp and dist.main else None
        self.model = self.loaded_model(device, empty=dist.fsdp)
        self.lm_loss = CausalLMLoss(self.model, recipe.neftune.alpha, recipe.neftune.scale,
                                    router_aux_coef=self.cfg.router_aux_loss_coef, precision=self.precision,
                                    measure=False)
        self.forward = parallel.wrap(self.lm_loss, dist, self.precision)  # DDP/FSDP around the loss module
        if dist.fsdp:
            parallel.materialize(self.lm_loss, source, dist)
            del source  # rank 0's host copy: every rank has its shards now
        self.check_model()
        self.peak_flops = peak_flops(device)
        mean_length = sum(self.lengths) / max(len(self.lengths), 1)
        self.token_flops = flops_per_token(self.model, mean_length) if self.peak_flops else None
        if self.dist.rank:
            seed_everything(self.cfg.seed + self.dist.rank)  # from here each rank its own dropout stream
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n_trained = sum(numel(p) for p in self.params)
        n_total = sum(numel(p) for p in self.model.parameters())
        compute, trained = (str(d).removeprefix("torch.") for d in (self.precision.compute, self.precision.trained))
        log(f"model: {n_total / 1e6:.2f}M parameters, {n_trained / 1e6:.3f}M trained ({recipe.finetune}), "
            f"computing in {compute}, trained weights in {trained} (precision {self.cfg.precision}), {device}")
        if (experts := param_lora_summary(self.model)) is not None:
            log(f"model: {experts}")
        if self.lm_loss.router_aux_coef:
            whose = "the model's" if self.cfg.router_aux_loss_coef is None else "train.router_aux_loss_coef"
            log(f"model: router load-balancing loss weighted {self.lm_loss.router_aux_coef:g} ({whose}), logged as "
                "router_aux_loss")

    def loaded_model(self, device: torch.device, *, empty: bool = False):
        """The model to train: the base (and LoRA), trained parameters in their master dtype, and a resumed run's
        trained weights; empty: on the meta device, without weights (they come from rank 0, see setup_model)."""
        model = load_model(self.recipe, device, empty=empty)
        self.precision.cast_trained([p for p in model.parameters() if p.requires_grad])
        if self.resume_from is not None and not empty:
            load_weights(model, self.resume_from)
        return model

    def check_model(self) -> None:
        """Start-up measurements and checks, each a tiny forward (through FSDP when it holds the weights): the
        noise's first-layer gain, packing isolation, and our forward against the model's own."""
        recipe, lm_loss = self.recipe, self.lm_loss

        def probe(check):
            return parallel.probe(self.forward, lm_loss, check, self.dist)

        if lm_loss.noise_alpha:
            lm_loss.first_layer_gain = probe(first_layer_gain)
        if self.cfg.batching == "pack" and not probe(attention_stays_within_examples):
            raise UsageError(f"train.batching: pack needs attention that stays within each packed example, and "
                             f"{recipe.model.name_or_path} with attn_implementation "
                             f"{recipe.model.attn_implementation} lets examples see each other; use batching: pad, "
                             f"or attn_implementation: flash_attention_2 or flex_attention")
        probe(lambda m: check_forward(m, recipe.model.name_or_path))
        if lm_loss.noise_alpha and lm_loss.first_layer_gain is None:
            log(f"warning: {type(self.lm_loss.decoder).__name__} transforms the embeddings non-linearly before its "
                "first layer (e.g. a LayerNorm); the noise is added to the embedding output, as the paper's code and "
                "transformers' hook do, and noise_norm is measured there")

    def setup_optimizer(self) -> None:
        cfg, device = self.cfg, self.dist.device
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: self.schedule.lr_factor(cfg.schedule, step))
        self.noise_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + self.dist.rank)

    def restore(self) -> int:
        """The optimizer, schedule and random streams of the checkpoint; returns its step."""
        state, where = self.resume_from.state, self.resume_from.folder / STATE_FILE
        try:  # what the structural check at read time cannot see: a state that is well formed but not this run's
            parallel.load_optimizer_state(self.forward, self.optimizer, state["optimizer"], self.dist)
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"][self.dist.rank], self.noise_generator)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise UsageError(f"{where}: cannot restore the optimizer, schedule and random state from it "
                             f"({type(e).__name__}: {first_line(e)}); move that checkpoint away to resume from the "
                             "one before it") from None
        log(f"resume: from {self.resume_from.folder} (step {state['step']} of {self.schedule.total_steps})")
        if not self.forced_changes and self.dist.main:  # the same setup: recorded where its model and data are now
            self.record_recipe()
        return state["step"]

    def record_setup(self) -> int:
        """A new run: the resolved recipe and the data report beside the checkpoints; it starts at step 0."""
        if self.dist.main:
            self.record_recipe()
            with atomic_file(self.run_dir.root / "data_report.json") as f:
                json.dump(self.data.report.to_dict(), f, indent=2)
        return 0

    def record_recipe(self) -> None:
        """The resolved recipe, which generate, eval and chat read the run's base model and template from."""
        with atomic_file(self.run_dir.root / "recipe.yaml") as f:
            f.write(recipe_to_yaml(self.recipe))

    # --- the loop ----------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, total = self.cfg, self.schedule.total_steps
        self.metrics = MetricsLog(self.run_dir.root, self.recipe, self.start_step) if self.dist.main else None
        self.progress = Progress(total, self.start_step, enabled=stdout_is_tty() and self.dist.main)
        self.started = self.window_start = time.perf_counter()
        self.window_tokens = 0
        last, step = {}, self.start_step
        try:
            with stop_on_signals() as stop, self.progress:
                if self.data.eval is not None and self.start_step == 0:  # the baseline the run is judged against
                    self.eval_loss(0)
                self.model.train()
                while step < total:
                    step += 1
                    faults.crash_point(f"step-{step}")
                    last = self.optimizer_step(step)
                    if step % cfg.log_every == 0 or step == total:
                        self.log_window(last)
                    if self.data.eval is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                                       or step == total):
                        last["eval_loss"] = self.eval_loss(step)
                    saved = None
                    if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                        saved = self.save_checkpoint(step)
                    if step < total:
                        self.stop_if_asked(stop, step, saved)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeFailure(f"CUDA out of memory - {OOM_HINT}") from None
        finally:
            if self.metrics is not None:
                self.metrics.close(finished=step == total)
        return self.finish(step, last)

    def micro_batches(self, step: int) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of optimizer step `step` (1-based) with their weight in the loss: 0 for a
        stand-in where this rank's share of the step comes up short (it must still run forward and backward)."""
        step_plan = self.plan.micro_batches(step)
        return [(mb, 1.0) if mb is not None else (step_plan[0], 0.0)
                for mb in parallel.my_share(step_plan, self.dist, pad=True)]

    def optimizer_step(self, step: int) -> dict:
        """Forward and backward over the step's micro-batches, then one update; returns the step's metrics."""
        dist, step_started = self.dist, time.perf_counter()
        batches = [(self.batch_of(self.data.train, mb), weight) for mb, weight in self.micro_batches(step)]
        # the router's balancing loss is a mean per forward: the step's is the mean over its micro-batches
        n_trained, n_tokens, n_forwards = parallel.sum_all(
            [sum(b.trained for b, w in batches if w), sum(b.tokens for b, w in batches if w),
             sum(1 for _, w in batches if w)], dist)
        loss_sum, aux_sum, norms = 0.0, 0.0, []
        for i, (batch, weight) in enumerate(batches):
            with parallel.grad_sync(self.forward, dist, last=i == len(batches) - 1):
                losses = self.forward(**batch, generator=self.noise_generator)
                # DDP/FSDP average gradients over the ranks; every trained token of the step weighs the same
                total = losses.loss * weight * dist.world / max(n_trained, 1)
                if losses.router_aux is not None:
                    aux = losses.router_aux * weight
                    total = total + self.lm_loss.router_aux_coef * aux * dist.world / max(n_forwards, 1)
                    aux_sum = aux_sum + aux.detach()
                total.backward()
            loss_sum = loss_sum + losses.loss.detach() * weight  # a tensor: no device sync per micro-batch
            if losses.noise_norms is not None and weight:
                norms.append(losses.noise_norms)
        noise_local = torch.cat(norms) if norms else torch.zeros(0)
        loss_total, aux_total, noise_total, noise_count = parallel.sum_all(
            [float(loss_sum), float(aux_sum), float(noise_local.sum()), noise_local.numel()], dist)
        step_loss = loss_total / max(n_trained, 1)
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = float(parallel.local(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
            raise RuntimeFailure(f"{what} at step {step}; stopped before updating the weights. Last good checkpoint: "
                                 f"{self.run_dir.latest_checkpoint() or 'none'}. Try a lower train.lr or "
                                 "train.max_grad_norm")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window_tokens += n_tokens
        record = {"step": step, "epoch": round(self.plan.epochs_done(step), 4), "loss": step_loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens": int(n_tokens), "trained_tokens": int(n_trained),
                  "noise_norm": noise_total / max(noise_count, 1)}
        if self.lm_loss.router_aux_coef:
            record["router_aux_loss"] = aux_total / max(n_forwards, 1)
        self.progress.update(step, record, n_tokens / max(time.perf_counter() - step_started, 1e-9))
        return record

    def log_window(self, last: dict) -> None:
        """A metrics record for the steps since the previous one: throughput (and MFU) over that window."""
        now = time.perf_counter()
        record = {**last, "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
                  "elapsed_s": now - self.started}
        if self.dist.enabled:
            record["tokens_per_s_per_process"] = record["tokens_per_s"] / self.dist.world
        if self.token_flops:  # CUDA, on a device whose peak we know
            record["mfu"] = record["tokens_per_s"] / self.dist.world * self.token_flops / self.peak_flops
        if (memory := peak_memory_gb(self.dist.device)) is not None:
            record["peak_memory_gb"] = memory
        self.write_metrics(record)
        self.progress.log(log_line(record))
        self.window_start, self.window_tokens = now, 0

    def eval_loss(self, step: int) -> float:
        loss = evaluate(self.forward, self.data.eval, self.batch_of, self.cfg.micro_batch_size, self.dist)
        self.write_metrics({"step": step, "eval_loss": loss})
        self.progress.print(f"step {step}: eval_loss {loss:.4f}")
        return loss

    def write_metrics(self, record: dict) -> None:
        if self.metrics is not None:  # rank 0 only
            self.metrics.write(record)

    def stop_if_asked(self, stop: StopRequest, step: int, saved: Path | None) -> None:
        """Any rank's signal stops every rank after the same step, with a checkpoint to resume from."""
        if not parallel.sum_all([stop.signum is not None], self.dist)[0]:
            return
        where = saved or self.save_checkpoint(step)  # not twice when the signal came on a save step
        signum = stop.signum or signal.SIGTERM
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {where}. "
                          f"Resume with: {self.resume_command}", code)

    # --- saving ------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """Every rank takes part (gathers); rank 0 writes."""
        dist = self.dist
        local_bad = int((~torch.stack([parallel.local(p.detach()).isfinite().all() for p in self.params])).sum())
        if parallel.sum_all([local_bad], dist)[0]:  # one device sync for all parameters
            raise RuntimeFailure(f"the weights hold NaN/inf after step {step}; not saving them. Last good checkpoint: "
                                 f"{self.run_dir.latest_checkpoint() or 'none'}. Try a lower train.lr")
        weights = parallel.full_model_state(self.model, dist)
        state = {"optimizer": parallel.optimizer_state(self.forward, self.optimizer, dist),
                 "scheduler": self.scheduler.state_dict(),
                 "rng": parallel.gather_object(rng_state(self.noise_generator), dist), "step": step}
        where = self.run_dir.checkpoints / f"step-{step}"
        if dist.main:
            meta = {"recipe": self.recipe.model_dump(mode="json"), "data_fingerprint": self.data.fingerprint,
                    "tokenizer_fingerprint": self.data.tokenizer_fingerprint,
                    "model_identity": folder_identity(self.recipe.model), "version": __version__,
                    "world_size": dist.world, "step": step}
            where = save_checkpoint(self.run_dir, step, self.model, state, meta, self.cfg.keep_last,
                                    self.serving_files, weights)
        parallel.barrier(dist)
        return where

    def finish(self, step: int, last: dict) -> dict:
        """final/ (the adapter or model with the tokenizer files to serve it), then the summary."""
        if self.recipe.finetune == "full":
            self.precision.cast_for_serving(self.params)
        weights = parallel.full_model_state(self.model, self.dist)
        if self.dist.main:
            save_final(self.run_dir, self.model, self.serving_files, weights)
        parallel.barrier(self.dist)
        final = self.run_dir.final
        summary = {"steps": step, "elapsed_s": round(time.perf_counter() - self.started, 1),
                   "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"), "final": str(final)}
        memory = ""
        if (peak := peak_memory_gb(self.dist.device)) is not None:
            summary["peak_memory_gb"] = round(peak, 2)
            memory = f", peak GPU memory {summary['peak_memory_gb']} GB"
        what = "adapter" if self.recipe.finetune == "lora" else "model"
        out.print(f"done: {step} steps in {summary['elapsed_s']}s, final loss {fmt(summary['final_loss'])}, "
                  f"eval loss {fmt(summary['eval_loss'])}{memory}; {what} in {final}", markup=False)
        if self.recipe.finetune == "lora":
            out.print(f"next: neftune merge {self.run_dir.root} --out merged/{self.run_dir.root.name}", markup=False)
        return summary


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
