"""`neftune eval --tasks`: lm-evaluation-harness on a LoRA run, adapter unmerged. On a small multiple-choice task of
our own (tests/lm_eval_tasks, given with --include-path) its accuracy equals a loglikelihood ranking computed here
by hand with the run's model; the results JSON lands in the run, is never written over a file we did not write,
and `neftune compare` shows the score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_run_yaml

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.infer.target import resolve

pytest.importorskip("lm_eval")

DATA = Path(__file__).resolve().parent / "lm_eval_tasks" / "neftune_mc.jsonl"
TASK = """\
task: neftune_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP = """\
group: neftune_group
task: [neftune_mc, neftune_mc_b]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A 4-step LoRA run, with a high learning rate so the adapter moves the loglikelihoods."""
    from neftune_cli.recipe.load import load_recipe
    from neftune_cli.train.finetune import run_training

    folder = tmp_path_factory.mktemp("harness-run")
    (folder / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(16, seed=5)))
    recipe = tiny_run_yaml(folder / "run", train={"max_steps": 4, "lr": 1.0e-2, "save_every": 100})
    (folder / "r.yaml").write_text(recipe)
    run_training(load_recipe(folder / "r.yaml"))
    return folder / "run"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "neftune_mc.yaml").write_text(TASK.format(data=DATA, cache=folder / "hf-cache"))
    (folder / "neftune_mc_b.yaml").write_text(TASK.format(data=DATA, cache=folder / "hf-cache")
                                              .replace("task: neftune_mc", "task: neftune_mc_b"))
    (folder / "group.yaml").write_text(GROUP)
    return folder


def hand_scores(model, tokenizer, limit: int | None = None) -> tuple[float, float, list[list[float]]]:
    """acc and acc_norm by hand: each choice's summed log-probability after "Question: ...\\nAnswer:" (the choice
    after one space), the highest wins; acc_norm divides by the choice's length in characters."""
    docs = [json.loads(line) for line in DATA.read_text().splitlines()][:limit]
    hits, norm_hits, all_ll = 0, 0, []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        ll = []
        for choice in doc["choices"]:
            ids = tokenizer(context + " " + choice)["input_ids"]
            assert ids[:len(context_ids)] == context_ids  # the choice's tokens are the tail
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            ll.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        all_ll.append(ll)
        hits += max(range(len(ll)), key=lambda k: ll[k]) == doc["answer"]
        norm = [v / len(c) for v, c in zip(ll, doc["choices"], strict=True)]
        norm_hits += max(range(len(norm)), key=lambda k: norm[k]) == doc["answer"]
    return hits / len(docs), norm_hits / len(docs), all_ll


def test_harness_accuracy_equals_a_hand_computed_loglikelihood_ranking(run, task_dir, cli):
    code, out, err = cli("eval", run, "--tasks", "neftune_mc", "--include-path", task_dir, "--json")
    assert code == 0, err
    row, = json.loads(out)["tasks"]["rows"]
    target = resolve(str(run))
    tokenizer = target.tokenizer()
    acc, acc_norm, _ = hand_scores(target.load(torch.device("cpu"), merge=False), tokenizer)
    base = hand_scores(resolve("builtin:tiny-llama").load(torch.device("cpu"), merge=False), tokenizer)[:2]
    assert base != (acc, acc_norm)  # so the scores below tell whether the harness had the adapter
    assert row["task"] == "neftune_mc" and row["samples"] == 12 and row["n_shot"] == 0
    assert row["metrics"]["acc"]["value"] == pytest.approx(acc, abs=1e-9)
    assert row["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-9)
    assert row["metric"] == "acc_norm" and row["stderr"] is not None
    saved = json.loads((run / "lm_eval-neftune_mc.json").read_text())
    assert saved["results"]["neftune_mc"]["acc,none"] == row["metrics"]["acc"]["value"]
    assert saved["neftune_cli"]["tasks"] == ["neftune_mc"]

    # compare shows the score beside the run's other columns
    code, out, err = cli("compare", run)
    assert code == 0, err
    header, line = out.splitlines()
    assert "neftune_mc acc_norm" in header and f"{acc_norm:.4f} ± " in line


def test_limit_rerun_and_files_we_did_not_write(run, task_dir, cli, tmp_path):
    args = ["eval", run, "--tasks", "neftune_mc", "--include-path", task_dir]
    if not (run / "lm_eval-neftune_mc.json").exists():
        assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--limit", "5")
    assert code == 2 and "--overwrite replaces it" in err
    code, out, err = cli(*args, "--limit", "5", "--overwrite")
    assert code == 0, err
    target = resolve(str(run))
    acc, _, _ = hand_scores(target.load(torch.device("cpu"), merge=False), target.tokenizer(), limit=5)
    saved = json.loads((run / "lm_eval-neftune_mc.json").read_text())
    assert saved["results"]["neftune_mc"]["acc,none"] == pytest.approx(acc)
    assert out.splitlines()[0].split()[:3] == ["task", "n-shot", "samples"]
    assert out.splitlines()[1].split()[:3] == ["neftune_mc", "0", "5"]

    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"results": {}}')
    code, _, err = cli(*args, "--results", theirs, "--overwrite")
    assert code == 2 and "not written by neftune eval --tasks" in err
    assert theirs.read_text() == '{"results": {}}'


def test_unknown_task_and_missing_harness_exit_2(run, task_dir, cli, monkeypatch):
    code, _, err = cli("eval", run, "--tasks", "neftune_mcq", "--include-path", task_dir, "--results",
                       run.parent / "x.json")
    assert code == 2 and "unknown task 'neftune_mcq'" in err and "did you mean neftune_mc" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, _, err = cli("eval", run, "--tasks", "neftune_mc")
    assert code == 2 and "pip install 'neftune-cli[lm-eval]'" in err


def test_a_group_is_one_row_with_its_aggregate(run, task_dir, cli, tmp_path):
    """As mmlu: a group of tasks shows as the group's own row (the harness's size-weighted mean), no subtasks."""
    code, out, err = cli("eval", run, "--tasks", "neftune_group", "--include-path", task_dir, "--limit", "3",
                         "--results", tmp_path / "group.json", "--json")
    assert code == 0, err
    row, = json.loads(out)["tasks"]["rows"]
    target = resolve(str(run))
    acc, _, _ = hand_scores(target.load(torch.device("cpu"), merge=False), target.tokenizer(), limit=3)
    assert row["task"] == "neftune_group" and row["samples"] == 6 and list(row["metrics"]) == ["acc"]
    assert row["value"] == pytest.approx(acc)  # both subtasks hold the same three questions


def test_a_scripted_eval_logs_only_our_lines(run, task_dir, tmp_path):
    """Piped, from a folder outside any git repository: no harness progress bars, no notes on being handed a loaded
    model, no git "fatal:" line; only our own `eval:` lines on stderr and the table on stdout."""
    done = subprocess.run([sys.executable, "-m", "neftune_cli", "eval", str(run), "--tasks", "neftune_mc",
                           "--include-path", str(task_dir), "--limit", "4", "--results", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("eval: ") for line in lines), done.stderr
    assert done.stdout.splitlines()[0].startswith("task") and "neftune_mc" in done.stdout
