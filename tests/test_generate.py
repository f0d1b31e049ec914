"""`neftune generate`: batched greedy equals a per-prompt model.generate loop, prompts equal the training prompts,
stops are cut, the output loads with AlpacaEval's own loader, a Ctrl-C keeps what was done, bad files exit 2."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from neftune_cli.data.pipeline import prepare
from neftune_cli.infer import generate as gen
from neftune_cli.infer.generate import Settings, Stops, read_prompts, stops_for
from neftune_cli.infer.target import Target, plain_data_section, resolve
from neftune_cli.io.errors import Interrupted
from neftune_cli.recipe.schema import Recipe

REPO_ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    {"instruction": "Reverse the word.", "input": "banana", "dataset": "demo"},
    {"instruction": "Count the letters in the word cat."},
    {"messages": [{"role": "user", "content": "Sort these numbers: 3 1 2"}]},
    {"instruction": "Add 2 and 3, then explain what you did in a long sentence with many words.", "dataset": "demo"},
    {"instruction": "Say hi."},
]


def _benchmark():
    """benchmarks/generate.py: the hand-written per-prompt model.generate loop and ours, one copy for both."""
    spec = importlib.util.spec_from_file_location("bench_generate", REPO_ROOT / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench = _benchmark()
per_prompt_loop = _bench.per_prompt_loop
batched = _bench.ours  # ours, with the {index: Answer} batches gathered back into prompt order


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    target = resolve(str(tiny_model_dir))
    tokenizer = target.tokenizer()
    return target, tokenizer, target.load(torch.device("cpu"), merge=True)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def test_greedy_batched_equals_a_per_prompt_generate_loop(tiny, prompts_file):
    target, tokenizer, model = tiny
    prompts = [p.ids for p in read_prompts(prompts_file, target, tokenizer)]
    stops = stops_for(target, tokenizer)
    settings = Settings(max_new_tokens=24, batch_size=3)  # prompts of different lengths share a padded batch
    ours = batched(model, prompts, settings, stops, tokenizer)
    assert ours == per_prompt_loop(model, prompts, settings, stops, tokenizer)
    assert ours == batched(model, prompts, settings, stops, tokenizer)  # deterministic


def test_greedy_equals_the_loop_on_a_real_model_and_alpaca_eval(shared_data):
    target = resolve(str(shared_data / "models/stories260K"), "alpaca")
    tokenizer = target.tokenizer()
    model = target.load(torch.device("cpu"), merge=True)
    prompts = [p.ids for p in read_prompts(shared_data / "alpaca_eval/alpaca_eval_instructions.json", target,
                                           tokenizer)[:12]]
    stops = stops_for(target, tokenizer)
    settings = Settings(max_new_tokens=32, batch_size=4)
    assert batched(model, prompts, settings, stops, tokenizer) == per_prompt_loop(model, prompts, settings, stops,
                                                                                  tokenizer)


def test_sampling_is_seeded(tiny, prompts_file):
    target, tokenizer, model = tiny
    prompts = [p.ids for p in read_prompts(prompts_file, target, tokenizer)]
    stops = stops_for(target, tokenizer)
    runs = [batched(model, prompts, Settings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s), stops, tokenizer)
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_pad_aware_repetition_penalty_equals_transformers_on_unpadded_rows():
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[5, 6, 5, 9], [7, 7, 8, 1]])
    scores = torch.randn(2, 12)
    stock = RepetitionPenaltyLogitsProcessor(1.2)(ids, scores.clone())
    assert torch.equal(gen.PadAwareRepetitionPenalty(1.2, torch.tensor([0, 0]))(ids, scores.clone()), stock)
    # two left pads of token 5 in row 0: only the real tokens 6, 9 are penalised
    padded = gen.PadAwareRepetitionPenalty(1.2, torch.tensor([2, 0]))(torch.tensor([[5, 5, 6, 9], [7, 7, 8, 1]]),
                                                                       scores.clone())
    alone = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[6, 9]]), scores[:1].clone())
    assert torch.equal(padded[0], alone[0])


class ScriptedLlama:
    """A tiny Llama whose next token follows a script per prompt (picked by the prompt's first real token)."""

    @staticmethod
    def build(config, scripts: dict[int, list[int]], filler: int):
        from transformers import LlamaForCausalLM

        class Scripted(LlamaForCausalLM):
            def forward(self, input_ids=None, attention_mask=None, **kwargs):
                result = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                if input_ids.shape[1] > 1:  # the prompt: remember each row's script and the prompt width
                    first = attention_mask.argmax(dim=1)
                    self.rows = [scripts[int(input_ids[r, first[r]])] for r in range(len(input_ids))]
                    self.width = input_ids.shape[1]
                step = attention_mask.shape[1] - self.width
                logits = torch.full_like(result.logits[:, -1:], -1e4)
                for r, script in enumerate(self.rows):
                    logits[r, 0, script[step] if step < len(script) else filler] = 0.0
                result.logits = logits
                return result

        return Scripted(config).eval()


def test_stops_at_eos_and_an_end_of_turn_string_and_strips_them(tiny):
    _, tokenizer, model = tiny
    eos = tokenizer.eos_token_id
    text_then_stop = tokenizer.encode("Hello END more", add_special_tokens=False)
    scripts = {10: [20, 21, eos, 22], 11: text_then_stop, 12: [23] * 50}
    scripted = ScriptedLlama.build(model.config, scripts, filler=24)
    stops = Stops([eos], ["END"])
    settings = Settings(max_new_tokens=8, repetition_penalty=1.0, batch_size=3)
    a, b, c = batched(scripted, [[10, 5], [11, 5, 6], [12]], settings, stops, tokenizer)
    assert (a.text, a.output_tokens, a.finish_reason) == (tokenizer.decode([20, 21]).strip(), 2, "stop")
    assert (b.text, b.finish_reason) == ("Hello", "stop")
    assert "END" in tokenizer.decode(text_then_stop[:b.output_tokens])
    assert "END" not in tokenizer.decode(text_then_stop[:b.output_tokens - 1])
    assert (c.output_tokens, c.finish_reason) == (8, "length")


def test_end_of_turn_becomes_a_stop_string_when_the_tokenizer_has_no_token_for_it(shared_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers/llama2")
    chatml = (shared_data / "chat_templates/chatml.jinja").read_text()
    data = plain_data_section("alpaca").model_copy(update={"template": "custom", "chat_template": chatml})
    assert stops_for(Target("x", None, data), tokenizer) == Stops([tokenizer.eos_token_id], ["<|im_end|>"])
    assert stops_for(Target("x", None, plain_data_section("alpaca")), tokenizer) == Stops([tokenizer.eos_token_id])


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama-2-chat", "mistral-instruct", "zephyr"])
def test_generation_prompts_equal_the_training_prompts(shared_data, tmp_path, template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers/llama2")
    records = [r for r in json.loads((shared_data / "alpaca/alpaca_data_first2k.json").read_text())[:40]
               if r["output"].strip()][:12]
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    (tmp_path / "train.json").write_text(json.dumps(records))
    data = {"sources": [{"path": str(tmp_path / "train.json"), "format": "alpaca"}], "max_seq_len": 2048,
            "cache": False}
    if template != "alpaca":
        data |= {"template": "custom", "chat_template": (shared_data / f"chat_templates/{template}.jinja").read_text()}
    recipe = Recipe.model_validate({"model": {"name_or_path": str(shared_data / "tokenizers/llama2")}, "data": data,
                                    "output": {"dir": str(tmp_path / "run")}})
    train = prepare(recipe, tokenizer, log=lambda _: None).train
    trained_prompts = [ids[:next(k for k, t in enumerate(labels) if t != -100)]
                       for ids, labels in zip(train["input_ids"], train["labels"], strict=True)]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input")}) + "\n" for r in records))
    target = Target("x", recipe.model, recipe.data, recipe)
    assert [p.ids for p in read_prompts(prompts_file, target, tokenizer)] == trained_prompts


def alpaca_eval_loader():
    """alpaca-eval's own loader, when the package is installed (pip install alpaca-eval; offline it skips)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # alpaca-eval 0.6 imports it at module level; setuptools 81+ dropped it; unused by the loader
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    utils = pytest.importorskip("alpaca_eval.utils")
    return utils.load_or_convert_to_dataframe, utils.get_generator_name


def test_output_loads_with_alpaca_evals_loader_and_jsonl_has_counts(cli, tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "answers.json"
    code, stdout, err = cli("generate", tiny_model_dir, "--prompts", prompts_file, "--out", out,
                            "--max-new-tokens", "6", "--batch-size", "2", "--generator", "tiny")
    assert code == 0, err
    assert "wrote 5 answers" in stdout
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [p.get("instruction", "Sort these numbers: 3 1 2") for p in PROMPTS]
    keys = {"instruction", "output", "generator"}
    assert [set(r) for r in rows] == [keys | ({"dataset"} if "dataset" in p else set()) for p in PROMPTS]
    load, generator_name = alpaca_eval_loader()
    frame = load(str(out))
    assert list(frame["output"]) == [r["output"] for r in rows]
    assert generator_name(None, frame) == "tiny"

    code, _, err = cli("generate", tiny_model_dir, "--prompts", prompts_file, "--out", tmp_path / "a.jsonl",
                       "--max-new-tokens", "6", "--format", "jsonl")
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["output"] for r in lines] == [r["output"] for r in rows]  # batch size changes nothing
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["output_tokens"] <= 6 and r["prompt_tokens"] > 0
               for r in lines)


def test_ctrl_c_writes_the_answers_done_and_exits_130(tiny, prompts_file, tmp_path, monkeypatch):
    target, _, _ = tiny
    real = gen.generate

    def interrupted_after_one_batch(*args):
        batches = real(*args)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "generate", interrupted_after_one_batch)
    out = tmp_path / "partial.json"
    with pytest.raises(Interrupted) as info:
        gen.run_generate(target, prompts_file, out, Settings(max_new_tokens=4, batch_size=2), fmt="json",
                         generator=None, limit=None)
    assert info.value.exit_code == 130
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and {r["instruction"] for r in rows} <= {p.get("instruction") for p in PROMPTS}


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "file not found"),
    ("bad.json", "[{\"instruction\": ", "invalid JSON"),
    ("obj.json", "{\"instruction\": \"x\"}", "expected a JSON list"),
    ("bad.jsonl", "{\"instruction\": \"x\"}\nnot json\n", "line 2: invalid JSON"),
    ("empty.json", "[]", "no prompts"),
    ("record.json", "[{\"instruction\": \"x\"}, 7]", "record 2: expected an object"),
    ("fields.json", "[{\"question\": \"x\"}]", "record 1:"),
    ("prompts.txt", "hello", "expected a .json or .jsonl file"),
])
def test_bad_prompt_files_exit_2_with_one_line(cli, tiny_model_dir, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, _, err = cli("generate", tiny_model_dir, "--prompts", path, "--out", tmp_path / "o.json")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o.json").exists()
