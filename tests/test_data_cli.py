"""``neftune data preview|stats|export``: through typer's CliRunner; exit codes through ``neftune_cli.cli.app.main``."""

from __future__ import annotations

import json
import re

import pytest
import typer
from data_helpers import write_jsonl
from typer.testing import CliRunner

from neftune_cli.cli.data import app as data_app
from neftune_cli.data.pipeline import prepare
from neftune_cli.io import console
from neftune_cli.models.loading import load_tokenizer
from neftune_cli.recipe.load import load_recipe

RECORDS = [
    {"instruction": "Reverse the word", "input": "apple", "output": "elppa"},
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "What is 'moon' in uppercase?", "input": "", "output": "MOON"},
]
RECIPE = """\
model:
  name_or_path: builtin:tiny-llama
data:
  sources:
    - path: data.jsonl
  template: {template}
output:
  dir: runs/x
train:
  micro_batch_size: 2
"""


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", RECORDS)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(template="alpaca"))
    return path


def invoke(*args: str):
    app = typer.Typer()
    app.callback()(lambda: None)
    app.add_typer(data_app, name="data")
    result = CliRunner().invoke(app, ["data", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_preview_marks_trained_text(recipe_file):
    out = invoke("preview", str(recipe_file), "-n", "2").stdout
    legend, body = out.split("\n", 1)
    assert legend.startswith("legend: [[text]] is trained")
    headers = [line for line in body.splitlines() if line.startswith("--- example")]
    assert [h.split(":")[0] for h in headers] == ["--- example 0", "--- example 1"]
    assert re.fullmatch(r"--- example 1: (\d+) tokens, 2 trained \(\d+%\)", headers[1])
    assert "### Response:\n[[elppa</s>]]" in body and "### Response:\n[[5</s>]]" in body
    assert body.count("[[") == 2 and body.startswith("--- example 0:")  # only the responses are trained
    only = invoke("preview", str(recipe_file), "--index", "2").stdout
    assert "--- example 2:" in only and "--- example 0:" not in only and "[[MOON</s>]]" in only


def test_preview_in_colour_on_a_terminal(recipe_file, monkeypatch):
    monkeypatch.setattr(console, "stdout_is_tty", lambda: True)
    out = invoke("preview", str(recipe_file), "-n", "1").stdout
    assert out.startswith("legend: green is trained") and "[[" not in out and "elppa</s>" in out


def test_stats_json_and_text(recipe_file):
    stats = json.loads(invoke("stats", str(recipe_file), "--json").stdout)
    assert stats["report"]["train"]["examples"] == 3 and stats["report"]["sources"][0]["records"] == 3
    assert set(stats["train_length_percentiles"]) == {"p5", "p25", "p50", "p75", "p95", "p99", "max"}
    assert sum(b["count"] for b in stats["train_length_histogram"]) == 3
    waste = stats["padding_waste"]
    assert waste["micro_batch_size"] == 2 and 0 < waste["pad_to_longest_random_batches"] < 1 and waste["packing"] == 0
    text = invoke("stats", str(recipe_file), "--set", "data.max_seq_len=40").stdout
    assert "data.jsonl [alpaca]: 3 records, 0 bad" in text and "padding waste at micro_batch_size 2" in text
    assert "train lengths: p5" in text and "end of turn (trained, generation stops on it): '</s>'" in text


def test_export_writes_the_dataset_in_order(recipe_file, tmp_path):
    out = tmp_path / "out" / "tokens.jsonl"
    assert "wrote 3 train examples" in invoke("export", str(recipe_file), str(out)).stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    loaded = load_recipe(recipe_file)
    expected = prepare(loaded.recipe, load_tokenizer(loaded.recipe.model)).train
    assert rows == [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in expected]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["preview", "{recipe}", "--index", "3"], "error: --index 3: the training set has 3 examples"),
        (["export", "{recipe}", "out.jsonl", "--split", "eval"], "error: --split eval: the recipe has no eval data"),
        (["stats", "{recipe}", "--set", "data.template=chat", "--set", "data.sources.0.path=bad.jsonl"], "bad.jsonl"),
    ],
)
def test_errors_exit_2_with_one_line(recipe_file, capsys, args, message):
    from neftune_cli.cli.app import main

    write_jsonl(recipe_file.parent / "bad.jsonl", [RECORDS[0], {"instruction": "x", "output": ""}])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", *[a.format(recipe=recipe_file) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and [line for line in err if line.startswith("error")] == err[-1:]
    if "bad.jsonl" in message:
        assert err[-1].endswith(
            "bad.jsonl: line 2: field output: empty (data.on_bad_record: skip skips bad records and counts them)"
        )
