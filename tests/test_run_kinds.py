"""Every command after training against every kind of run it accepts (issue 21): LoRA, DoRA, full fine-tuning,
QLoRA (bitsandbytes runs NF4 on a CPU), a run dir, one of its checkpoints, and the merged folder. A run the tool
made must never be refused by the tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_faults import RECIPE, one_error

from neftune_cli.demo import tasks as demo_tasks

KINDS = {
    "lora": RECIPE,
    "dora": RECIPE.replace("lora: {r: 4, alpha: 8}", "lora: {r: 4, alpha: 8, use_dora: true}"),
    "full": RECIPE.replace("lora: {r: 4, alpha: 8}", "finetune: full"),
    "qlora": RECIPE.replace("builtin:tiny-llama", "builtin:tiny-llama\n  quantization: nf4"),
}
GENERATE = ("--max-new-tokens", "3", "--limit", "2")


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory, tiny_model_dir):
    """(kind, folder) with a 2-step run in folder/run (a checkpoint per step) and prompts.jsonl."""
    if request.param == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra (bitsandbytes)")
    from neftune_cli.cli.app import main

    folder = tmp_path_factory.mktemp(request.param)
    (folder / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(16, seed=3)))
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"instruction": f"Count the items: {x}"}) + "\n"
                                                  for x in ("a, b", "c")))
    path = folder / "r.yaml"
    path.write_text(KINDS[request.param].replace("{out}", json.dumps(str(folder / "run")))
                    .replace("max_steps: 4", "max_steps: 2").replace("keep_last: 1", "keep_last: 2"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    assert exit_info.value.code == 0
    return request.param, folder


@pytest.mark.parametrize("which", ["run", "checkpoint"])
def test_generate_and_eval(cli, trained, which):
    kind, folder = trained
    model = folder / "run" if which == "run" else folder / "run" / "checkpoints" / "step-1"
    out = folder / f"answers-{which}.jsonl"
    code, _, err = cli("generate", model, "--prompts", folder / "prompts.jsonl", "--out", out, "--format", "jsonl",
                       "--overwrite", *GENERATE)
    assert code == 0, err
    assert len(out.read_text().split("\n")) == 3
    code, stdout, err = cli("eval", model, "--data", folder / "train.jsonl", "--answers", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["loss"]["examples"] == 16


def test_compare_and_plot(cli, trained):
    kind, folder = trained
    code, stdout, err = cli("compare", folder / "run", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["steps"] == 2
    code, _, err = cli("plot", folder / "run", "--out", folder / "curves.png", "--overwrite")
    assert code == 0, err


def test_merge_then_generate_and_eval_the_merged_folder(cli, trained):
    kind, folder = trained
    merged = folder / "merged"
    code, _, err = cli("merge", folder / "run", "--out", merged, "--overwrite")
    if kind == "full":  # nothing to merge: the run's final/ is already a whole model
        assert code == 2
        one_error(err)
        merged = folder / "run" / "final"
    else:
        assert code == 0, err
    code, _, err = cli("generate", merged, "--prompts", folder / "prompts.jsonl", "--out", folder / "m.json",
                       "--overwrite", *GENERATE)
    assert code == 0, err
    code, _, err = cli("eval", merged, "--data", folder / "train.jsonl")
    assert code == 0, err


def test_merge_of_a_checkpoint(cli, trained):
    kind, folder = trained
    if kind == "full":
        pytest.skip("a full fine-tuning checkpoint is a whole model")
    code, _, err = cli("merge", folder / "run" / "checkpoints" / "step-1", "--out", folder / "merged-1",
                       "--overwrite", "--no-verify")
    assert code == 0, err
    assert Path(folder / "merged-1" / "config.json").is_file()
