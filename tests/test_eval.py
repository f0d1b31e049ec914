"""`neftune eval`, `compare` and `plot`: held-out loss equal to the training loop's, the paper's length and
diversity numbers on hand-made answers, the comparison table, and a PNG that opens."""

from __future__ import annotations

import json
import sys

import pytest
from run_helpers import tiny_run_yaml

from neftune_cli.analysis.answers import answer_stats, diversity, repetition
from neftune_cli.analysis.compare import compare_rows
from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.infer.eval_loss import heldout_loss
from neftune_cli.infer.target import resolve
from neftune_cli.io.errors import UsageError


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A 6-step LoRA run with NEFTune noise and an eval every 2 steps."""
    from neftune_cli.recipe.load import load_recipe
    from neftune_cli.train.finetune import run_training

    folder = tmp_path_factory.mktemp("eval-run")
    (folder / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(48, seed=3)))
    (folder / "eval.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(10, seed=4, split="eval")))
    (folder / "r.yaml").write_text(tiny_run_yaml(
        folder / "run", eval_data=True, lora={"modules_to_save": ["lm_head"]},
        train={"epochs": 1, "grad_accum": 2, "eval_every": 2, "save_every": 2, "keep_last": 10}))
    run_training(load_recipe(folder / "r.yaml"))
    return folder / "run"


def logged_evals(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def test_eval_loss_equals_what_the_training_loop_logged(run):
    logged = logged_evals(run)
    assert heldout_loss(resolve(str(run)))["eval_loss"] == pytest.approx(logged[6], abs=1e-6)
    # a checkpoint is evaluated as it was at its step
    assert heldout_loss(resolve(str(run / "checkpoints/step-4")))["eval_loss"] == pytest.approx(logged[4], abs=1e-6)
    assert logged[6] < logged[0]


def test_eval_on_a_data_file_uses_the_runs_template(run, cli):
    code, out, err = cli("eval", run, "--data", run.parent / "eval.jsonl", "--json")
    assert code == 0, err
    loss = json.loads(out)["loss"]
    assert loss["eval_loss"] == pytest.approx(logged_evals(run)[6], abs=1e-6)  # the same 10 examples
    assert loss["examples"] == 10 and loss["trained_tokens"] > 0
    assert loss["perplexity"] == pytest.approx(2.718281828 ** loss["eval_loss"], rel=1e-6)
    # a recipe: its eval split (here the run's own recipe, so the same examples again)
    assert heldout_loss(resolve(str(run)), run.parent / "r.yaml")["eval_loss"] == pytest.approx(loss["eval_loss"],
                                                                                                abs=1e-6)


def test_eval_needs_data_for_a_plain_model(cli, tiny_model_dir):
    code, _, err = cli("eval", tiny_model_dir)
    assert code == 2 and "give --data" in err and len(err.strip().splitlines()) == 1


ANSWERS = [
    {"instruction": "a", "output": "a b a b", "generator": "m"},  # 2-grams ab ba ab; 3-grams aba bab; 4-gram abab
    {"instruction": "b", "output": "c d e", "generator": "m"},  # 2-grams cd de; 3-gram cde
]


def test_repetition_and_diversity_on_hand_made_answers():
    texts = [a["output"] for a in ANSWERS]
    assert repetition(texts, 2) == pytest.approx(100 * (1 - 4 / 5))  # unique per answer 2 + 2, total 3 + 2
    assert repetition(texts, 3) == 0.0 and repetition(texts, 4) == 0.0
    assert diversity(texts) == pytest.approx(0.8)
    assert repetition(["x x x x x"], 2) == pytest.approx(75.0)  # 4 bigrams, 1 unique
    assert diversity(["x x x x x"]) == pytest.approx(0.25 * (1 - 2 / 3) * (1 - 1 / 2))


def test_answer_lengths_and_the_share_cut_at_max_new_tokens(tiny_tokenizer):
    stats = answer_stats(ANSWERS, tiny_tokenizer, max_new_tokens=4)
    tokens = [len(tiny_tokenizer(a["output"], add_special_tokens=False)["input_ids"]) for a in ANSWERS]
    assert stats["chars"] == {"mean": 6.0, "median": 6.0, "p90": pytest.approx(6.8)}
    assert stats["tokens"]["mean"] == pytest.approx(sum(tokens) / 2, abs=0.05)
    assert stats["hit_max_new_tokens"] == sum(t >= 4 for t in tokens) / 2
    with_reasons = [a | {"finish_reason": r} for a, r in zip(ANSWERS, ["length", "stop"], strict=True)]
    assert answer_stats(with_reasons, tiny_tokenizer)["hit_max_new_tokens"] == 0.5
    assert answer_stats(ANSWERS, tiny_tokenizer)["hit_max_new_tokens"] is None
    assert stats["rep_2"] == 20.0 and stats["diversity"] == 0.8


def test_eval_answers_cli(cli, tiny_model_dir, tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(ANSWERS))
    code, out, err = cli("eval", tiny_model_dir, "--answers", path)
    assert code == 0, err
    assert "rep-2 20.0%" in out and "diversity 0.8" in out
    path.write_text(json.dumps([{"instruction": "x"}]))
    code, _, err = cli("eval", tiny_model_dir, "--answers", path)
    assert code == 2 and 'answer 1: expected an object with a string "output"' in err


def test_compare_rows(run, tmp_path):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(ANSWERS))
    [row] = compare_rows([run], [answers])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert (row["alpha"], row["scale"], row["steps"]) == (5.0, "paper", 6)
    assert row["tokens"] == sum(r["tokens"] for r in steps)  # log_every 1: every step's tokens
    assert row["wall_s"] == pytest.approx(steps[-1]["elapsed_s"], abs=0.05)
    assert row["train_loss"] == steps[-1]["loss"] and row["eval_loss"] == logged_evals(run)[6]
    assert row["rep_2"] == 20.0 and row["diversity"] == 0.8
    with pytest.raises(UsageError, match="one answers file per run"):
        compare_rows([run, run], [answers])


def test_compare_cli_table(run, cli):
    code, out, err = cli("compare", run, run)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split() == ["run", "alpha", "scale", "steps", "tokens", "wall_s", "train_loss", "eval_loss"]
    assert len(rows) == 2 and rows[0].split()[:4] == ["run", "5", "paper", "6"]


def test_plot_writes_a_png_that_opens(run, cli, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    code, _, err = cli("plot", run, "--out", tmp_path / "curves.png")
    assert code == 0, err
    pixels = image.imread(tmp_path / "curves.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_plot_without_matplotlib_names_the_extra(run, cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = cli("plot", run, "--out", tmp_path / "curves.png")
    assert code == 2 and err.strip() == "error: neftune plot needs matplotlib: pip install 'neftune-cli[plot]'"


def test_a_merged_run_answers_like_the_run(run, tmp_path):
    """The merged folder's tokenizer carries the Alpaca prompt's jinja twin: generate recognises it and uses the
    Alpaca prompt itself, so records with an input get the "### Input:" prompt the run was trained on."""
    import torch

    from neftune_cli.infer.generate import Settings, generate, read_prompts, stops_for
    from neftune_cli.merge import merge

    merged = merge(run, tmp_path / "merged", log=lambda _: None).out
    prompts_file = run.parent / "eval.jsonl"
    answers = []
    for target in (resolve(str(run)), resolve(str(merged))):
        tokenizer = target.tokenizer()
        prompts = [p.ids for p in read_prompts(prompts_file, target, tokenizer)]
        model = target.load(torch.device("cpu"), merge=True)
        done = {}
        for part in generate(model, tokenizer, prompts, Settings(max_new_tokens=8), stops_for(target, tokenizer)):
            done |= part
        answers.append((target.data.template, prompts, [done[i] for i in range(len(prompts))]))
    assert answers[1][0] == "alpaca"
    assert answers[0][1:] == answers[1][1:]
