"""Recipe schema and `neftune validate`, through the CLI: exit codes and messages."""

import json
from pathlib import Path

import pytest
import yaml

from neftune_cli.recipe.load import load_recipe, recipe_to_yaml
from neftune_cli.recipe.schema import Recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

MINIMAL = """\
model:
  name_or_path: builtin:tiny-llama
data:
  sources:
    - path: data.jsonl
      format: alpaca
output:
  dir: runs/x
"""


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    return tmp_path


def write(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(cli, name):
    code, out, err = cli("validate", str(RECIPES / name))
    assert code == 0, err
    assert f"ok: {RECIPES / name} is valid" in out


def test_shipped_llama2_alpaca_is_the_paper_setup():
    r = load_recipe(RECIPES / "llama2-alpaca.yaml").recipe
    t = r.train
    assert (t.lr, t.micro_batch_size * t.grad_accum, t.epochs, r.data.max_seq_len) == (5e-5, 128, 3, 512)
    assert (t.schedule, t.warmup_ratio, t.weight_decay, t.max_grad_norm) == ("cosine", 0.03, 0.0, 1.0)
    assert (r.model.dtype, r.neftune.alpha, r.neftune.scale, r.finetune) == ("bfloat16", 5, "paper", "lora")
    assert load_recipe(RECIPES / "mistral-sharegpt.yaml").recipe.neftune.alpha == 10


def test_round_trip(recipe_dir):
    loaded = load_recipe(write(recipe_dir, MINIMAL))
    again = Recipe.model_validate(yaml.safe_load(recipe_to_yaml(loaded.recipe)))
    assert again == loaded.recipe
    assert again.train.lr == 5e-5 and again.lora.target_modules == "all-linear"


def test_relative_paths_resolve_against_the_recipe_folder(recipe_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # somewhere else
    loaded = load_recipe(write(recipe_dir, MINIMAL))
    assert loaded.recipe.data.sources[0].path == str((recipe_dir / "data.jsonl").resolve())
    assert loaded.recipe.model.name_or_path == "builtin:tiny-llama"
    hub = load_recipe(write(recipe_dir, MINIMAL.replace("data.jsonl", "tatsu-lab/alpaca")))
    assert hub.recipe.data.sources[0].path == "tatsu-lab/alpaca"


def test_validate_marks_where_each_value_came_from(cli, recipe_dir):
    path = write(recipe_dir, MINIMAL + "train:\n  lr: 0.001\n")
    code, out, _ = cli("validate", str(path), "--set", "train.epochs=1", "--set", "neftune.alpha=10")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith("ok:")}
    assert lines["train.lr"].endswith("(recipe)") and "0.001" in lines["train.lr"]
    assert lines["train.epochs"].endswith("(--set)") and lines["neftune.alpha"].endswith("(--set)")
    assert lines["train.micro_batch_size"].endswith("(default)")
    assert lines["model.name_or_path"].endswith("(recipe)")


def test_validate_json(cli, recipe_dir):
    code, out, _ = cli("validate", str(write(recipe_dir, MINIMAL)), "--json", "--set", "data.sources.0.max_samples=5")
    assert code == 0
    doc = json.loads(out)
    assert doc["recipe"]["train"]["lr"] == 5e-5
    assert doc["recipe"]["data"]["sources"][0]["max_samples"] == 5
    assert doc["provenance"]["data.sources.0.max_samples"] == "--set"
    assert doc["provenance"]["train.lr"] == "default"


def test_set_validates_like_the_file(cli, recipe_dir):
    path = write(recipe_dir, MINIMAL)
    code, _, err = cli("validate", str(path), "--set", "train.lr=-1")
    assert code == 2 and "train.lr" in err and "-1" in err


def test_full_finetune_without_lora(recipe_dir):
    r = load_recipe(write(recipe_dir, MINIMAL + "finetune: full\n")).recipe
    assert r.lora_or_none is None


BAD = {
    "typo in a nested key": (MINIMAL + "train:\n  lrr: 0.1\n", [], "unknown key train.lrr (did you mean `train.lr`?)"),
    "unknown top-level section": (MINIMAL + "trainer: {}\n", [], "unknown key trainer (did you mean `train`?)"),
    "section key at the top level": (MINIMAL + "lr: 0.1\n", [], "did you mean `train.lr`?"),
    "wrong type": (MINIMAL + "train:\n  micro_batch_size: four\n", [], "train.micro_batch_size"),
    "negative lr": (MINIMAL + "train:\n  lr: -0.001\n", [], "train.lr: Input should be greater than 0 (got -0.001)"),
    "lora r=0": (MINIMAL + "lora:\n  r: 0\n", [], "lora.r"),
    "negative noise alpha": (MINIMAL + "neftune:\n  alpha: -1\n", [], "neftune.alpha"),
    "max_seq_len below 8": (MINIMAL.replace("output:", "  max_seq_len: 4\noutput:"), [], "data.max_seq_len"),
    "unknown enum": (MINIMAL + "train:\n  schedule: cosin\n", [], "train.schedule"),
    "missing model": (
        MINIMAL.replace("model:\n  name_or_path: builtin:tiny-llama\n", ""),
        [],
        "model: required key is missing",
    ),
    "unknown format": (MINIMAL.replace("format: alpaca", "format: alpacca"), [], "data.sources[0].format"),
    "missing data file": (MINIMAL.replace("data.jsonl", "nope.jsonl"), [], "data.sources[0].path: file not found"),
    "yaml syntax error": (MINIMAL + "train: {lr: 0.1\n", [], "YAML syntax error at line"),
    "empty file": ("", [], "the file is empty"),
    "a list": ("- model\n- data\n", [], "not a list"),
    "bad --set syntax": (MINIMAL, ["--set", "train.lr"], "expected KEY=VALUE"),
    "--set of a missing key": (MINIMAL, ["--set", "train.learning_rate=1"], "no such key train.learning_rate"),
    "--set past a list end": (MINIMAL, ["--set", "data.sources.3.path=x"], "not an index"),
    "custom template without one": (
        MINIMAL.replace("output:", "  template: custom\noutput:"),
        [],
        "data.chat_template",
    ),
    "lora with full fine-tuning": (MINIMAL + "finetune: full\nlora:\n  r: 8\n", [], "finetune is full"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipes_exit_2_naming_the_problem(cli, recipe_dir, case):
    text, extra, expected = BAD[case]
    path = write(recipe_dir, text)
    code, out, err = cli("validate", str(path), *extra)
    assert code == 2, (out, err)
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # one line per problem


def test_yaml_error_names_the_line(cli, recipe_dir):
    path = write(recipe_dir, MINIMAL + "train:\n  lr: [1\n")
    _, _, err = cli("validate", str(path))
    assert "line 11" in err or "line 12" in err


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("validate", str(tmp_path / "none.yaml"))
    assert code == 2 and "recipe file not found" in err


def test_readme_recipe_reference_matches_the_schema():
    from neftune_cli.recipe.reference import reference_markdown

    readme = (RECIPES.parent / "README.md").read_text()
    block = readme.split("<!-- recipe-reference:start -->\n")[1].split("<!-- recipe-reference:end -->")[0]
    assert block == reference_markdown(), "regenerate the README's recipe reference from neftune_cli.recipe.reference"


def test_validate_warns_about_hf_noise_under_packing(cli, recipe_dir):
    path = write(recipe_dir, MINIMAL)
    code, _, err = cli("validate", str(path), "--set", "neftune.scale=hf")
    assert code == 0 and "warning: neftune.scale: hf with train.batching: pack" in err
    code, _, err = cli("validate", str(path), "--set", "neftune.scale=hf", "--set", "train.batching=pad")
    assert code == 0 and "warning" not in err
    assert "warning" not in cli("validate", str(path))[2]
