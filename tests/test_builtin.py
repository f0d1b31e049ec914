"""The builtin tiny model (neftune_cli.demo.builtin) and the demo data (neftune_cli.demo.tasks)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT
from neftune_cli.demo import builtin
from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.io import atomic, cache_dir
from neftune_cli.io.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "recipes" / "data"
NAME = "tiny-llama"


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def all_demo_records() -> list[dict]:
    return demo_tasks.train_records() + demo_tasks.eval_records()


# ------------------------------------------------------------------------------------------- materialise


def test_materialize_is_deterministic_and_survives_crash_leftovers(tmp_path, tiny_model_dir):
    root = tmp_path / "other"
    parent = root / "builtin"
    # Leftovers of crashed builds: a stale temp folder, a fresh one (maybe another process's), and a final
    # folder without the completion marker (e.g. copied by hand, half of it).
    stale = parent / f".tmp-{NAME}-v{builtin.VERSION}-123-dead"
    fresh = parent / f".tmp-{NAME}-v{builtin.VERSION}-456-busy"
    final = parent / f"{NAME}-v{builtin.VERSION}"
    for d in (stale, fresh, final):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{half", encoding="utf-8")
    old = time.time() - 2 * atomic.STALE_S
    os.utime(stale, (old, old))

    path = builtin.materialize(NAME, root=root)

    assert path == final
    assert builtin.is_complete(path)
    assert file_hashes(path) == file_hashes(tiny_model_dir)  # same bytes in a different root
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= set(file_hashes(path))
    assert not stale.exists()  # stale leftovers are cleaned up
    assert fresh.exists()  # a recent one may be another process at work: left alone
    assert [
        p.name for p in parent.iterdir() if p.name.startswith(".tmp-") and p != fresh and "broken" not in p.name
    ] == []


def test_materialize_reuses_a_complete_folder(tiny_model_dir, neftune_cache, monkeypatch):
    before = file_hashes(tiny_model_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}

    def no_build(*a, **k):
        raise AssertionError("rebuilt an existing complete folder")

    monkeypatch.setattr(builtin, "_build", no_build)
    assert builtin.materialize(NAME, root=neftune_cache) == tiny_model_dir
    # resolve() uses $NEFTUNE_CACHE, which conftest points at the session cache.
    assert builtin.resolve("builtin:tiny-llama") == str(tiny_model_dir)
    assert file_hashes(tiny_model_dir) == before
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == mtimes


def test_default_root_is_neftune_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir.cache_root() == tmp_path / "c"
    monkeypatch.delenv("NEFTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir.cache_root() == tmp_path / "home" / ".cache" / "neftune-cli"


def test_crash_during_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(name, out):
        out.mkdir(parents=True, exist_ok=True)  # the build gets an empty folder
        (out / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin.materialize(NAME, root=tmp_path)
    assert list((tmp_path / "builtin").iterdir()) == []


def test_losing_a_race_uses_the_winners_folder(tmp_path, tiny_model_dir, monkeypatch):
    final = tmp_path / "builtin" / f"{NAME}-v{builtin.VERSION}"

    def build_while_another_process_wins(name, out):
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)  # our own (complete) build...
        shutil.copytree(tiny_model_dir, final)  # ...but the other process renames its copy first

    monkeypatch.setattr(builtin, "_build", build_while_another_process_wins)
    assert builtin.materialize(NAME, root=tmp_path) == final
    assert builtin.is_complete(final)
    assert file_hashes(final) == file_hashes(tiny_model_dir)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]  # our temp copy is gone


def test_resolve_unknown_and_non_builtin_names(tmp_path):
    expected = "model.name_or_path: unknown builtin model 'x'; available: builtin:tiny-llama"
    with pytest.raises(UsageError) as e:
        builtin.resolve("builtin:x")
    assert str(e.value) == expected
    with pytest.raises(UsageError, match="unknown builtin model 'nope'"):
        builtin.materialize("nope", root=tmp_path)
    assert not (tmp_path / "builtin").exists()
    for other in ("meta-llama/Llama-2-7b-hf", "./models/mine", "/abs/path", "tiny-llama"):
        assert builtin.resolve(other) == other


# Digests of builtin:tiny-llama v3 (weights; tokenizer vocabulary + merges), see the test below.
PINNED = ("74809d2f8f418b47", "7f64d5c3d318bf98")


def test_fingerprint_is_pinned(tiny_model_dir):
    """Weights and vocabulary are exactly what v3 always was, on every machine.

    If this fails after an intentional change (builtin.py or demo_tasks.py), bump builtin.VERSION (so old
    caches are not reused) and update the digests.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.contiguous().view(-1).numpy().tobytes())
    model = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = hashlib.sha256(json.dumps([model["vocab"], model["merges"]], sort_keys=True).encode()).hexdigest()
    assert (h.hexdigest()[:16], vocab[:16]) == PINNED


# ------------------------------------------------------------------------------------------- load, use


def test_model_loads_and_runs(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size >= len(tiny_tokenizer) and cfg.vocab_size % 8 == 0
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
    )
    assert next(model.parameters()).dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 3_000_000

    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert gen.eos_token_id == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert gen.pad_token_id == tiny_tokenizer.pad_token_id

    ids = tiny_tokenizer("Sort the numbers in ascending order.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # not a degenerate (all-zero) initialisation


def test_tokenizer_special_tokens_and_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    assert [tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token] == ["<unk>", "<s>", "</s>", "<pad>"]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(6))
    assert 768 <= len(tok) <= 2048

    ids = tok("x").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] != tok.eos_token_id  # like Llama: no EOS appended
    assert tok("x", add_special_tokens=False).input_ids == ids[1:]
    # Special tokens in text are single tokens.
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False).input_ids[0] == 4
    # Trained on the prompt template: its markers are a few tokens, not one per byte.
    assert tok.tokenize("### Response:") == ["###", "ĠResponse", ":"]
    assert len(tok.tokenize(ALPACA_PROMPT_INPUT)) < len(ALPACA_PROMPT_INPUT) // 3


def test_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "Reverse the word 'moon'."}, {"role": "assistant", "content": "noom"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|im_start|>user\nReverse the word 'moon'.<|im_end|>\n<|im_start|>assistant\nnoom<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(tok.bos_token)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The double-BOS trap is real (like Llama-2-chat): rendered text + add_special_tokens=True.
    assert tok(prompt).input_ids[:2] == [tok.bos_token_id, tok.bos_token_id]
    assert tok(prompt, add_special_tokens=False).input_ids.count(tok.bos_token_id) == 1


def test_decode_round_trips_every_demo_text(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = []
    for r in all_demo_records():
        texts += [r["instruction"], r["input"], r["output"], " " + r["output"], "\n" + r["output"] + "\n"]
        template = ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT
        texts.append(template.format(**r) + r["output"])
    texts += ["  two  spaces\n\n\ttab", "naïve café – 日本語 🙂", "\r\n"]
    encoded = tok(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, encoded, strict=True):
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


# ------------------------------------------------------------------------------------------- demo data


def test_committed_demo_files_match_the_generator():
    files = {demo_tasks.TRAIN_FILE: demo_tasks.train_records(), demo_tasks.EVAL_FILE: demo_tasks.eval_records()}
    for name, records in files.items():
        committed = (DATA_DIR / name).read_text(encoding="utf-8")
        regenerate = "python -m neftune_cli.demo.tasks --out recipes/data"
        assert committed == demo_tasks.to_jsonl(records), f"{name} drifted from the generator: {regenerate}"
    assert len(demo_tasks.train_records()) == 1400 and len(demo_tasks.eval_records()) == 200


def test_demo_main_writes_the_files(tmp_path, capsys):
    assert demo_tasks.main(["--out", str(tmp_path)]) == 0
    for name in (demo_tasks.TRAIN_FILE, demo_tasks.EVAL_FILE):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes()


def test_eval_is_disjoint_from_train():
    train = demo_tasks.train_records()
    evals = demo_tasks.eval_records()
    train_keys = {(r["instruction"], r["input"]) for r in train}
    assert not [r for r in evals if (r["instruction"], r["input"]) in train_keys]
    # Not even the same problem (task + arguments) under another phrasing.
    train_problems = {p for p, _ in demo_tasks.draw(demo_tasks.TRAIN_SIZE, demo_tasks.TRAIN_SEED, "train")}
    eval_problems = {p for p, _ in demo_tasks.draw(demo_tasks.EVAL_SIZE, demo_tasks.EVAL_SEED, "eval")}
    assert train_problems.isdisjoint(eval_problems)
    assert all(demo_tasks.split_of(p) == "eval" for p in eval_problems)
    assert len(train_keys) == len(train)  # no duplicates either
    assert len({(r["instruction"], r["input"]) for r in evals}) == len(evals)


def test_generate_is_deterministic_and_well_formed():
    a = demo_tasks.generate(300, seed=7)
    assert a == demo_tasks.generate(300, seed=7)
    assert a != demo_tasks.generate(300, seed=8)
    assert all(set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values()) for r in a)
    assert all(r["instruction"] and r["output"] for r in a)
    assert any(r["input"] == "" for r in a) and any(r["input"] for r in a)
    with pytest.raises(ValueError):
        demo_tasks.generate(1, seed=0, split="test")


def test_demo_answers_are_correct():
    """Every record's output really answers its question (the model learns a real function)."""
    import re

    sequences = [list(s) for s in demo_tasks.SEQUENCES]
    for r in all_demo_records():
        instr, inp, out = r["instruction"], r["input"], r["output"]
        low = instr.lower()
        # The word asked about: the input, else the quoted word, else the question's last word.
        quoted = re.search(r"'(\w+)'", instr)
        word = inp or (quoted.group(1) if quoted else re.findall(r"\w+", instr)[-1])
        if "count" in low or "how many" in low or "number of words" in low:
            assert out == str(len(inp.split(", "))), r
        elif "opposite" in low or "antonym" in low:
            assert demo_tasks.OPPOSITES[word] == out and demo_tasks.OPPOSITES[out] == word, r
        elif "kind of thing" in low or "group" in low or "categor" in low or "classify" in low:
            assert word in demo_tasks.CATEGORIES[out], r
        elif "after" in low or "follows" in low or "next" in low:
            (seq,) = [s for s in sequences if word in s]
            assert out == seq[(seq.index(word) + 1) % len(seq)], r
        else:
            a, b = map(int, re.findall(r"\d+", inp or instr))
            assert "add" in low or "plus" in low or "sum" in low or "+" in instr, r
            assert out == str(a + b), r


def test_demo_check_scores_each_task_and_shows_a_right_and_a_wrong_answer(tmp_path, capsys):
    from neftune_cli.demo import check as demo_check

    tasks, records = zip(*demo_check.eval_tasks(), strict=True)
    assert len(records) == demo_tasks.EVAL_SIZE and set(tasks) == {"count", "category", "opposite", "add", "next"}
    right = [k for k, task in enumerate(tasks) if task == "count"][:3]  # 3 count answers right, the rest wrong
    for name, answers in (("before", ["?"] * len(records)),
                          ("after", [r["output"] if k in right else "?" for k, r in enumerate(records)])):
        lines = [json.dumps({"instruction": r["instruction"], "output": a})
                 for r, a in zip(records, answers, strict=True)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    assert demo_check.main([str(tmp_path / "before.jsonl"), str(tmp_path / "after.jsonl")]) == 0
    out = capsys.readouterr().out
    scores = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:7]}
    n_count = tasks.count("count")
    assert scores["count"] == [str(n_count), "0.0%", "->", f"{3 / n_count:.1%}"]
    assert scores["all"] == [str(len(records)), "0.0%", "->", f"{3 / len(records):.1%}"]
    assert scores["add"][-1] == "0.0%"
    shown = out.split("first wrong one of each task:\n")[1].splitlines()
    assert len(shown) == 6 and sum(line.endswith("(ok)") for line in shown) == 1  # count's right one, 5 wrong
    (tmp_path / "short.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(SystemExit, match="not the answers"):
        demo_check.main([str(tmp_path / "before.jsonl"), str(tmp_path / "short.jsonl")])
