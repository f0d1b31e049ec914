"""The `neftune` command: parse arguments, load the recipe, dispatch, and map errors to exit codes.

No work happens here; each command calls one module (recipe, data, train, merge).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import typer

try:  # recent typer vendors click; its usage errors live there
    from typer._click.exceptions import ClickException
except ImportError:
    from click import ClickException

from neftune_cli import __version__
from neftune_cli.cli.data import app as data_app
from neftune_cli.cli.launch import EXIT_CODE_DIR, run_torchrun
from neftune_cli.io.console import debug_requested, err, log, out, quiet_libraries, stdout_is_tty, table
from neftune_cli.io.errors import (
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_USAGE,
    OOM_HINT,
    NeftuneError,
    UsageError,
    first_line,
)
from neftune_cli.io.outputs import check_output_file
from neftune_cli.models.loading import check_against_config, local_config
from neftune_cli.models.quantization import require_bitsandbytes
from neftune_cli.recipe.load import load_recipe, lookup

app = typer.Typer(
    name="neftune",
    help="Instruction fine-tuning with paper-faithful NEFTune noise: validate, preview data, train, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data", help="Inspect how a recipe's data is tokenized and masked.")

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. train.lr=1e-4. Repeatable.")


def _version(value: bool) -> None:
    if value:
        out.print(f"neftune-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """neftune: fine-tune open LLMs from the shell. Exit codes: 0 ok, 1 runtime failure, 2 bad usage/recipe/data,
    130 interrupted (SIGINT), 143 terminated (SIGTERM)."""


@app.command()
def validate(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved recipe and provenance as JSON."),
) -> None:
    """Check a recipe and print every value it resolves to, with where it came from (default/recipe/--set).

    Example: neftune validate recipes/llama2-alpaca.yaml --set train.lr=1e-4
    """
    loaded = load_recipe(recipe, set_)
    for warning in loaded.warnings():
        log(f"warning: {warning}")
    config = local_config(loaded.recipe.model)
    if config is not None:  # a hub model not yet downloaded is checked when train loads it
        check_against_config(loaded.recipe, config)
    resolved = loaded.recipe.model_dump(mode="json")
    if as_json:
        out.print_json(json.dumps({"recipe": resolved, "provenance": loaded.provenance}))
        return
    width = max(len(k) for k in loaded.provenance)
    for key, source in loaded.provenance.items():
        value = json.dumps(lookup(resolved, key))
        line = f"{key:<{width}}  {value}  "
        style = {"default": "dim", "recipe": "none", "--set": "bold yellow"}[source]
        if stdout_is_tty():
            out.print(line, markup=False, end="")
            out.print(f"({source})", style=style, markup=False)
        else:
            out.print(line + f"({source})", markup=False)
    if loaded.recipe.lora_or_none is not None:  # why one would choose QLoRA, before renting the GPU
        from neftune_cli.recipe.memory import summary

        for line in summary(loaded.recipe.model, loaded.recipe.lora):
            out.print(line, markup=False)
    if loaded.recipe.model.quantization:
        try:
            require_bitsandbytes(f"model.quantization: {loaded.recipe.model.quantization}")
        except NeftuneError as e:
            log(f"warning: {e}")
    out.print(f"ok: {recipe} is valid", markup=False)


@app.command()
def train(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output.dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing output.dir and start over."),
    force: bool = typer.Option(False, "--force", help="Resume even if the recipe, data or tokenizer changed."),
    nproc: int = typer.Option(None, "--nproc", min=1, help="Processes (GPUs) on this machine: runs torchrun."),
) -> None:
    """Fine-tune as the recipe says; writes checkpoints, metrics.jsonl and final/ to output.dir.

    Example: neftune train recipes/demo.yaml --set train.max_steps=50
    """
    from neftune_cli.train.finetune import run_training

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    # everything that can be checked before torchrun starts N processes (each would print the same error, and
    # torchrun its traceback after them)
    loaded = load_recipe(recipe, set_)
    if resume and not Path(loaded.recipe.output.dir).is_dir():  # and leave no empty run dir behind
        raise UsageError(f"--resume: output.dir {loaded.recipe.output.dir} does not exist, so there is nothing to "
                         "resume; drop --resume to start the run")
    if loaded.recipe.model.quantization:  # before the data step, not after it
        require_bitsandbytes(f"model.quantization: {loaded.recipe.model.quantization}")
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from neftune_cli.train.parallel import Dist, check_batch

        check_batch(loaded.recipe.train.grad_accum, loaded.recipe.train.micro_batch_size, Dist(world=nproc))
        run_torchrun(nproc)
    again = ["neftune", "train", str(recipe), *[f"--set {shlex.quote(s)}" for s in set_ or []], "--resume"]
    run_training(loaded, resume=resume, overwrite=overwrite, force=force, resume_command=" ".join(again))


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="Run dir (uses final/), checkpoint dir, or any PEFT LoRA adapter dir."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged model (must not exist)."),
    base: str = typer.Option(None, "--base", help="Base model id or folder (default: from adapter_config.json)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bfloat16|float16|float32 (auto: the base's dtype)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda: where verification runs (merging is on the CPU)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip comparing merged and adapter logits."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Fold a LoRA adapter into its base model: a plain HF model that loads anywhere.

    Example: neftune merge runs/demo --out merged/demo
    """
    from neftune_cli.merge import merge as merge_adapter

    if dtype not in {"auto", "bfloat16", "float16", "float32"}:
        raise typer.BadParameter(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32")
    if device not in {"cpu", "cuda"}:
        raise typer.BadParameter(f"--device {device}: expected cpu or cuda")
    result = merge_adapter(
        adapter, out_dir, base=base, dtype=dtype, max_shard_size=max_shard_size, device=device,
        verify=not no_verify, overwrite=overwrite, log=log,
    )
    out.print(f"merged model written to {result.out}", markup=False)


ModelArg = typer.Argument(..., help="Run dir, checkpoint dir, merged folder, hub id or builtin:... model.",
                          show_default=False)
TemplateOpt = typer.Option(None, "--template", help="chat|alpaca: prompt format of a plain model (default: chat; "
                           "a run uses its own).")
# Decoding options, shared by generate and chat
MaxNewTokensOpt = typer.Option(512, "--max-new-tokens", min=1)
RepetitionPenaltyOpt = typer.Option(1.2, "--repetition-penalty", min=1.0,
                                    help="1.2 as the paper generated for AlpacaEval; 1 turns it off.")
TemperatureOpt = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above 0: sampling.")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature).")
SeedOpt = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Sampling seed.")


@app.command()
def generate(
    model: str = ModelArg,
    prompts: Path = typer.Option(..., "--prompts", help=".json/.jsonl of instruction (+ input) or messages records."),
    out_file: Path = typer.Option(..., "--out", help="Output file (must not exist, or --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (never an input)."),
    fmt: str = typer.Option("json", "--format", help="json: AlpacaEval model outputs; jsonl: with token counts and "
                            "finish reasons."),
    max_new_tokens: int = MaxNewTokensOpt,
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    repetition_penalty: float = RepetitionPenaltyOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    generator: str = typer.Option(None, "--generator", help="Generator name in the output (default: the run's)."),
    template: str = TemplateOpt,
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N prompts."),
) -> None:
    """Answer a prompts file with the run's own prompt template: AlpacaEval model outputs.

    Example: neftune generate runs/demo --prompts ../shared/data/alpaca_eval/alpaca_eval_instructions.json
    --out answers.json
    """
    from neftune_cli.infer.generate import Settings, run_generate
    from neftune_cli.infer.target import resolve

    if fmt not in {"json", "jsonl"}:
        raise typer.BadParameter(f"--format {fmt}: expected json or jsonl")
    check_output_file(out_file, overwrite=overwrite,
                      inputs=[prompts, *([Path(model).expanduser()] if Path(model).expanduser().exists() else [])])
    settings = Settings(max_new_tokens=max_new_tokens, batch_size=batch_size, repetition_penalty=repetition_penalty,
                        temperature=temperature, top_p=top_p, seed=seed)
    run_generate(resolve(model, _template(template)), prompts, out_file, settings, fmt=fmt, generator=generator,
                 limit=limit)


@app.command()
def chat(
    model: str = ModelArg,
    system: str = typer.Option(None, "--system", help="System message (chat templates; the Alpaca prompt's task "
                               "description)."),
    max_new_tokens: int = MaxNewTokensOpt,
    repetition_penalty: float = RepetitionPenaltyOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    template: str = TemplateOpt,
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda (auto: cuda when there is one)."),
) -> None:
    """Talk to the model in its training prompt format: streamed, multi-turn on a terminal; one answer per line
    from a pipe.

    Example: neftune chat runs/demo    (or: echo "Add 2 and 3." | neftune chat runs/demo)
    """
    from neftune_cli.infer.chat import open_session, run_chat
    from neftune_cli.infer.generate import Settings
    from neftune_cli.infer.target import inference_device, resolve

    settings = Settings(max_new_tokens=max_new_tokens, batch_size=1, repetition_penalty=repetition_penalty,
                        temperature=temperature, top_p=top_p, seed=seed)
    where = inference_device(device)
    run_chat(open_session(resolve(model, _template(template)), settings, system=system, device=where))


@app.command("eval")
def eval_(
    model: str = ModelArg,
    data: Path = typer.Option(None, "--data", help="A recipe (its eval split) or a data file (all of it); default: "
                              "the run's eval data."),
    answers: Path = typer.Option(None, "--answers", help="AlpacaEval outputs (or generate's jsonl) to measure."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="The limit the answers were "
                                       "generated with (to count cut answers when they carry no finish reason)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Default: the run's micro_batch_size "
                                   "(--tasks on other models: 8)."),
    template: str = TemplateOpt,
    tasks: str = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated, e.g. "
                              "arc_easy,hellaswag,mmlu,truthfulqa_mc2 (needs the lm-eval extra)."),
    limit: int = typer.Option(None, "--limit", min=1, help="--tasks: at most N documents per task."),
    num_fewshot: int = typer.Option(None, "--num-fewshot", min=0, help="--tasks: few-shot examples (default: "
                                    "each task's own)."),
    include_path: Path = typer.Option(None, "--include-path", help="--tasks: a folder of task YAMLs (the "
                                      "harness's format) besides its own."),
    results_file: Path = typer.Option(None, "--results", help="--tasks: where the harness's results JSON goes "
                                      "(default: RUN/lm_eval-TASKS.json for a run; other models: not written)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="--tasks: replace a results file an earlier "
                                   "eval --tasks wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Held-out loss and perplexity (no noise, training masks); with --answers their length and diversity; with
    --tasks benchmark scores from lm-evaluation-harness.

    Example: neftune eval runs/demo --answers answers.json
    """
    from neftune_cli.analysis.answers import answer_stats, format_stats, read_answers
    from neftune_cli.infer.eval_loss import has_eval_data, heldout_loss
    from neftune_cli.infer.target import resolve

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else []
    if tasks is not None and not names:
        raise typer.BadParameter(f"--tasks {tasks!r}: no task names")
    written = None
    if names:  # fail on a missing extra or a results file we may not replace before loading anything
        from neftune_cli.infer import harness

        harness.require_lm_eval()
        written = harness.results_path(model, names, results_file)
        if written is not None:
            harness.check_writable(written, overwrite)
    target = resolve(model, _template(template))
    result = {}
    if data is not None or has_eval_data(target) or (answers is None and not names):
        result["loss"] = heldout_loss(target, data, batch_size)
    if answers is not None:
        result["answers"] = answer_stats(read_answers(answers), target.tokenizer(), max_new_tokens)
    if names:
        results = harness.run_tasks(target, model, names, limit=limit, num_fewshot=num_fewshot,
                                    batch_size=batch_size, include_path=include_path)
        if written is not None:
            harness.write_results(written, results)
            log(f"eval: wrote the harness's results to {written}")
        else:
            log("eval: results JSON not written (MODEL is not a run dir; --results FILE writes it)")
        result["tasks"] = {"results_file": str(written) if written else None, "rows": harness.task_rows(results)}
    if as_json:
        out.print_json(json.dumps(result))
        return
    if "loss" in result:
        loss = result["loss"]
        out.print(f"eval loss {loss['eval_loss']:.4f}, perplexity {loss['perplexity']:.2f} ({loss['examples']} "
                  f"examples, {loss['trained_tokens']:,} trained tokens; {loss['data']})", markup=False)
    for line in format_stats(result["answers"]) if answers is not None else []:
        out.print(line, markup=False)
    if names:
        for line in table(*harness.format_rows(result["tasks"]["rows"])):
            out.print(line, markup=False)


def _template(template: str | None) -> str | None:
    if template not in (None, "chat", "alpaca"):
        raise typer.BadParameter(f"--template {template}: expected chat or alpaca")
    return template


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories.", show_default=False),
    answers: list[Path] = typer.Option(None, "--answers", help="One answers file per run, in the same order."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """One row per run: noise, steps, tokens, time, train and eval loss (and answer length/diversity).

    Example: neftune compare runs/base runs/neft --answers base.json --answers neft.json
    """
    from neftune_cli.analysis.compare import compare_rows, format_table

    rows = compare_rows(runs, answers or [])
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for line in format_table(rows):
        out.print(line, markup=False)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories.", show_default=False),
    out_file: Path = typer.Option(..., "--out", help="PNG file to write (must not exist, or --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Train and eval loss curves of runs, one line per run (needs the plot extra: matplotlib).

    Example: neftune plot runs/base runs/neft --out curves.png
    """
    from neftune_cli.analysis.plot import plot_curves

    plot_curves(runs, out_file, overwrite=overwrite)
    out.print(f"wrote {out_file}", markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    grid: list[str] = typer.Option(..., "--grid", metavar="KEY=V1,V2,...", help="Values of a key (the --set "
                                   "grammar; commas inside [...] belong to a value). Repeatable: one run per "
                                   "combination."),
    prompts: Path = typer.Option(None, "--generate", metavar="PROMPTS", help="Answer these prompts after each "
                                 "training; generate's options (--max-new-tokens ...) follow it."),
    print_: bool = typer.Option(False, "--print", help="Print one self-contained command per run (for a SLURM "
                                "array, GNU parallel, a job queue) instead of running them."),
    collect: bool = typer.Option(False, "--collect", help="Only print the table (and plot) of the finished runs."),
    only: str = typer.Option(None, "--only", metavar="RUN", help="Run just this one combination (as --print "
                             "writes it)."),
    nproc: int = typer.Option(None, "--nproc", min=1, help="Processes (GPUs) per run: each trains under torchrun."),
) -> None:
    """One training run per combination of the grid under OUTPUT_DIR/<key=value>, then compare's table of all.

    Restartable: finished runs are skipped, an interrupted one resumes exactly.
    Example: neftune sweep recipes/llama2-alpaca.yaml --grid neftune.alpha=0,5,10,15 --generate prompts.json
    --max-new-tokens 256
    """
    from neftune_cli.analysis.compare import format_table
    from neftune_cli.cli import sweep as sweeps

    if print_ + collect + (only is not None) > 1:
        raise typer.BadParameter("--print, --collect and --only exclude each other")
    planned = sweeps.plan(recipe, set_ or [], grid, prompts, _generate_args(ctx, prompts), nproc)
    if print_:
        sweeps.print_commands(planned)
        return
    if not collect:
        sweeps.run_sweep(planned, only)
    if only is None:
        for line in format_table(sweeps.collect(planned)):
            out.print(line, markup=False)


def _generate_args(ctx: typer.Context, prompts: Path | None) -> list[str]:
    """The sweep's options after --generate are generate's: checked by generate's own parser, now."""
    args = list(ctx.args)
    if args and prompts is None:
        raise typer.BadParameter(f"{args[0]}: not an option of sweep (generate's options come with --generate)")
    taken = [a for a in args if a.split("=")[0] in ("--prompts", "--out")]
    if taken:
        raise typer.BadParameter(f"{taken[0]}: the sweep sets it (--generate PROMPTS; answers in OUTPUT_DIR/answers)")
    if args:
        generate_command = ctx.find_root().command.get_command(ctx, "generate")
        try:
            generate_command.make_context("generate", ["MODEL", "--prompts", str(prompts), "--out", "-", *args])
        except ClickException as e:
            raise UsageError(f"sweep --generate: {e.format_message()}") from None
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn every failure into one line and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_requested(argv)
    quiet_libraries(debug)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="neftune", standalone_mode=False) or 0
    except SystemExit as e:  # click turns a broken stdout pipe (`| head` has read enough) into a silent exit 1
        if not isinstance(e.__context__, BrokenPipeError):
            raise
        _silence_stdout()
        code = EXIT_SIGPIPE  # quiet, and what a shell reports for cat in the same pipe
    except NeftuneError as e:
        code = _report(e, f"error: {e}", e.exit_code, debug)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        code = EXIT_SIGINT
    except ClickException as e:  # usage errors from argument parsing
        if debug:
            traceback.print_exc()
        e.show(file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = _report(None, "interrupted", EXIT_SIGINT, debug)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        from neftune_cli.train.parallel import is_peer_failure

        if is_peer_failure(e) and not debug:
            code = EXIT_RUNTIME  # the process that failed has said why
        else:
            code = _report(e, f"error: {type(e).__name__}: {first_line(e)}" + _hint(e), EXIT_RUNTIME, debug)
            if not debug:  # not one of our messages: the traceback is where the cause is
                err.print("(run with --debug for the traceback)", markup=False)
    try:
        sys.stdout.flush()  # here, not at exit, where a broken pipe is a traceback the user did not ask for
    except BrokenPipeError:
        _silence_stdout()
        code = code or EXIT_SIGPIPE
    if EXIT_CODE_DIR in os.environ:  # a rank under `--nproc`: tell the wrapper how this process ended
        (Path(os.environ[EXIT_CODE_DIR]) / os.environ.get("RANK", "0")).write_text(str(code))
    sys.exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit finds no broken pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _report(exc: BaseException | None, message: str, code: int, debug: bool) -> int:
    if debug and exc is not None:
        traceback.print_exception(exc)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: say which process failed
        message = message.replace("error: ", f"error: [rank {os.environ.get('RANK', '?')}] ", 1)
    err.quiet = False  # ranks other than 0 are quiet but for their own errors
    err.print(message, markup=False)
    return code


def _hint(e: Exception) -> str:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f" - hint: {OOM_HINT}"
    return ""
