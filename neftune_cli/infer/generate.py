"""`neftune generate`: answers to a prompts file in the AlpacaEval model-outputs format.

Prompts are tokenized by ``data.prompt_ids``, the code path the training parity gate checks, so the model sees
exactly the prompt tokens it was trained on. They are sorted by length and decoded in left-padded batches with
the KV cache (transformers' ``generate``); answers stop at EOS or the template's end-of-turn, which is stripped.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neftune_cli.data.pipeline import prompt_ids, stop_token_ids
from neftune_cli.data.templates import end_of_turn, make_template
from neftune_cli.infer.target import Target, inference_device
from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.console import log, out, stdout_is_tty
from neftune_cli.io.errors import EXIT_SIGINT, DataError, Interrupted, UsageError
from neftune_cli.io.jsonl import json_lines

# The paper generated greedily with repetition penalty 1.2 for AlpacaEval.
PAPER_REPETITION_PENALTY = 1.2


@dataclass
class Settings:
    max_new_tokens: int = 512
    batch_size: int = 16
    repetition_penalty: float = PAPER_REPETITION_PENALTY
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Stops:
    token_ids: list[int]
    strings: list[str] = field(default_factory=list)  # an end-of-turn the tokenizer has no single token for


@dataclass
class Prompt:
    record: dict
    instruction: str  # what AlpacaEval calls the instruction (the last user turn of a conversation)
    ids: list[int]


@dataclass
class Answer:
    text: str
    output_tokens: int  # generated tokens before the stop (an EOS / end-of-turn token is not counted)
    finish_reason: str  # "stop" (EOS or end-of-turn) or "length" (hit max_new_tokens)


def read_prompts(path: Path, target: Target, tokenizer) -> list[Prompt]:
    """Records of a .json list or a .jsonl file, each formatted by the training template (DataError names it)."""
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: no prompts in the file")
    prompts = []
    for i, record in enumerate(records):
        where = f"{path}: record {i + 1}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with instruction (+ input) or messages, "
                            f"got {type(record).__name__}")
        try:
            ids = prompt_ids(record, target.data, tokenizer)
        except DataError as e:
            raise DataError(f"{where}: {str(e).removeprefix('prompt: ')}") from None
        prompts.append(Prompt(record, _instruction(record), ids))
    return prompts


def _read_records(path: Path) -> list:
    if not path.is_file():
        raise UsageError(f"--prompts {path}: file not found")
    if path.suffix not in (".json", ".jsonl"):
        raise UsageError(f"--prompts {path}: expected a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if path.suffix == ".jsonl":
        records = []
        for n, line in json_lines(text):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of prompt records, got {type(records).__name__}")
    return records


def _instruction(record: dict) -> str:
    if isinstance(record.get("instruction"), str):
        return record["instruction"]
    turns = record.get("messages") or record.get("conversations") or []
    user = [t for t in turns if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human")]
    return str(user[-1].get("content", user[-1].get("value", ""))) if user else ""


def stops_for(target: Target, tokenizer) -> Stops:
    """EOS and the template's end-of-turn: as a token when it is one, else as a string to cut at."""
    eot = end_of_turn(make_template(target.data, tokenizer))
    as_text = eot and eot not in tokenizer.get_added_vocab() and eot != tokenizer.eos_token
    return Stops(stop_token_ids(target.data, tokenizer), [eot] if as_text else [])


class PadAwareRepetitionPenalty:
    """transformers' repetition penalty over each row's real tokens only.

    The stock processor also penalises the left padding of a batch (the pad token is often EOS), so a batched
    answer could differ from the same prompt decoded alone; here every prompt is treated as if it were alone.
    """

    def __init__(self, penalty: float, pad_lengths: torch.Tensor):
        self.penalty = penalty
        self.pad_lengths = pad_lengths  # (batch,) left pads per row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = (positions[None, :] >= self.pad_lengths[:, None]).to(scores.dtype)
        seen = torch.zeros_like(scores).scatter_add_(1, input_ids, real) > 0
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


def generation_config(settings: Settings, stops: Stops, pad_id: int):
    """Every decoding knob set here, so a model's own generation_config.json changes nothing."""
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sample,
        temperature=settings.temperature if sample else None, top_p=settings.top_p if sample else None,
        top_k=None, eos_token_id=stops.token_ids or None, pad_token_id=pad_id,
        stop_strings=stops.strings or None, use_cache=True,
    )


def generate(model, tokenizer, prompts: list[list[int]], settings: Settings, stops: Stops,
             streamer=None) -> Iterator[dict[int, Answer]]:
    """Answer every prompt, longest first, in left-padded batches; yields {prompt index: Answer} per batch.
    streamer (one prompt at a time, as transformers streams): gets the prompt, then each new token (`chat`)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, stops)
    config = generation_config(settings, stops, pad_id)
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        width = max(len(prompts[i]) for i in batch)
        pads = torch.tensor([width - len(prompts[i]) for i in batch], device=device)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= pads[:, None]).long()
        processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            processors.append(PadAwareRepetitionPenalty(settings.repetition_penalty, pads))
        with torch.inference_mode():
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       logits_processor=processors, tokenizer=tokenizer if stops.strings else None,
                                       streamer=streamer)
        yield {i: finish(row[width:].tolist(), tokenizer, stops, settings.max_new_tokens)
               for i, row in zip(batch, generated, strict=True)}


def _pad_id(tokenizer, stops: Stops) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops.token_ids[0] if stops.token_ids else 0


def finish(new_ids: list[int], tokenizer, stops: Stops, max_new_tokens: int) -> Answer:
    """The answer in a row of generated ids: cut at the first stop token or stop string, which is dropped."""
    cut = next((k for k, t in enumerate(new_ids) if t in stops.token_ids), None)
    ids = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in stops.strings:
        if stop in text:
            text = text[:text.index(stop)]
            # the tokens up to the one that completed the stop string
            cut = bisect.bisect_left(range(len(ids) + 1), True,
                                     key=lambda k: stop in tokenizer.decode(ids[:k], skip_special_tokens=True))
            ids = ids[:cut]
    stopped = cut is not None
    reason = "stop" if stopped or len(new_ids) < max_new_tokens else "length"
    return Answer(text.strip(), len(ids), reason)


def run_generate(target: Target, prompts_file: Path, out_file: Path, settings: Settings, *, fmt: str,
                 generator: str | None, limit: int | None) -> dict:
    """Load, read prompts, generate, write the output; on Ctrl-C write what is done and exit 130."""
    tokenizer = target.tokenizer()
    prompts = read_prompts(prompts_file, target, tokenizer)[:limit]
    stops = stops_for(target, tokenizer)
    device = inference_device()
    model = target.load(device, merge=True)
    name = generator or target.name
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and settings.max_new_tokens > positions:  # decoding past the positions only wastes hours
        raise UsageError(f"--max-new-tokens {settings.max_new_tokens} is more than the model's {positions} "
                         "positions; lower it")
    over = sum(len(p.ids) + settings.max_new_tokens > positions for p in prompts) if positions else 0
    if over:
        log(f"warning: {over} prompts plus max_new_tokens are longer than the model's {positions} positions; "
            "their answers go beyond what it was trained on")
    log(f"generate: {len(prompts)} prompts, batch {settings.batch_size}, max_new_tokens {settings.max_new_tokens}, "
        f"{decoding(settings)}, stops {stops.token_ids + stops.strings}, {next(model.parameters()).dtype}, {device}")
    answers: dict[int, Answer] = {}
    started = time.perf_counter()
    try:
        with BatchProgress(len(prompts)) as advance:
            for done in generate(model, tokenizer, [p.ids for p in prompts], settings, stops):
                answers.update(done)
                advance(len(answers), sum(a.output_tokens for a in answers.values()), time.perf_counter() - started)
    except KeyboardInterrupt:
        write_answers(out_file, prompts, answers, name, fmt)
        raise Interrupted(f"interrupted: wrote the {len(answers)} of {len(prompts)} answers done to {out_file}",
                          EXIT_SIGINT) from None
    write_answers(out_file, prompts, answers, name, fmt)
    elapsed = time.perf_counter() - started
    new_tokens = sum(a.output_tokens for a in answers.values())
    summary = {"answers": len(answers), "new_tokens": new_tokens, "elapsed_s": round(elapsed, 2),
               "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1),
               "hit_max_new_tokens": sum(a.finish_reason == "length" for a in answers.values())}
    out.print(f"wrote {len(answers)} answers to {out_file} ({new_tokens:,} tokens in {elapsed:.1f}s, "
              f"{summary['tokens_per_s']:,.0f} tokens/s; {summary['hit_max_new_tokens']} hit max_new_tokens)",
              markup=False)
    return summary


def decoding(settings: Settings) -> str:
    how = "greedy" if settings.temperature <= 0 else (f"sampling (temperature {settings.temperature}, "
                                                     f"top_p {settings.top_p}, seed {settings.seed})")
    return f"{how}, repetition_penalty {settings.repetition_penalty}"


def write_answers(path: Path, prompts: list[Prompt], answers: dict[int, Answer], generator: str, fmt: str) -> None:
    """json: AlpacaEval's model outputs (a list of instruction/output/generator[/dataset]); jsonl: one object per
    answer with token counts and the finish reason. In prompt order; only answered prompts (after a Ctrl-C)."""
    rows = []
    for i in sorted(answers):
        a, record = answers[i], prompts[i].record
        row = {"instruction": prompts[i].instruction, "output": a.text, "generator": generator}
        if "dataset" in record:
            row["dataset"] = record["dataset"]
        if fmt == "jsonl":
            row |= {"index": i, "prompt_tokens": len(prompts[i].ids), "output_tokens": a.output_tokens,
                    "finish_reason": a.finish_reason}
        rows.append(row)
    with atomic_file(path) as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            json.dump(rows, f, ensure_ascii=False, indent=2)


class BatchProgress:
    """A rich bar on a terminal; a plain line per batch otherwise (logs, CI, nohup)."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None
        if stdout_is_tty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=out)
            self.task = self.bar.add_task("generate", total=total, rate="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self.advance

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self, done: int, tokens: int, elapsed: float) -> None:
        rate = f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s"
        if self.bar:
            self.bar.update(self.task, completed=done, rate=rate)
        else:
            log(f"generate: {done}/{self.total} answers, {rate}")
