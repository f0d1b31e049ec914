"""Token-budget packing: the plan, the steps it makes, and training and resuming with it (CPU, tiny model)."""

from __future__ import annotations

import json
import random
import signal

import pytest

from neftune_cli.data.batching import StepPlan, plan_epoch
from neftune_cli.demo import tasks as demo_tasks

LENGTHS = [random.Random(0).randint(5, 120) for _ in range(500)]


def test_a_token_budget_plan_covers_every_example_once_within_the_budget():
    plan = plan_epoch(LENGTHS, 4, seed=0, epoch=0, group_by_length=False, token_budget=400)
    assert sorted(i for mb in plan for i in mb) == list(range(len(LENGTHS)))
    sizes = [sum(LENGTHS[i] for i in mb) for mb in plan]
    assert max(sizes) <= 400
    # greedy: a micro-batch closed only because its successor's first example would not fit
    assert all(size + LENGTHS[nxt[0]] > 400 for size, nxt in zip(sizes, plan[1:], strict=False))
    assert plan == plan_epoch(LENGTHS, 4, seed=0, epoch=0, group_by_length=False, token_budget=400)
    assert plan != plan_epoch(LENGTHS, 4, seed=0, epoch=1, group_by_length=False, token_budget=400)


def test_an_example_as_long_as_the_budget_gets_a_micro_batch_of_its_own():
    plan = plan_epoch([50, 100, 50], 4, seed=0, epoch=0, group_by_length=False, token_budget=100)
    assert sorted(map(sorted, plan)) == [[0], [1], [2]] or sorted(map(sorted, plan)) == [[0, 2], [1]]


def test_step_plan_across_epochs_of_different_lengths():
    plan = StepPlan(LENGTHS, micro_batch_size=4, grad_accum=3, seed=1, group_by_length=False, token_budget=300)
    counts = [plan.steps_in_epoch(e) for e in range(3)]
    assert plan.total_steps(3) == sum(counts)
    seen = []
    for step in range(1, counts[0] + 1):
        assert plan.locate(step) == (0, step - 1)
        seen += [i for mb in plan.micro_batches(step) for i in mb]
    assert sorted(seen) == list(range(len(LENGTHS)))  # epoch 0's steps train each example once
    assert plan.locate(counts[0] + 1) == (1, 0)
    assert plan.epochs_done(counts[0]) == pytest.approx(1.0)
    assert plan.epochs_done(counts[0] + counts[1]) == pytest.approx(2.0)


def test_without_a_budget_the_plan_is_the_old_one():
    plan = StepPlan(LENGTHS, micro_batch_size=8, grad_accum=2, seed=0, group_by_length=True, token_budget=None)
    old = plan_epoch(LENGTHS, 8, seed=0, epoch=0, group_by_length=True)
    assert plan.micro_batches(1) == old[:2] and plan.steps_in_epoch(0) == 32


RECIPE = """\
model: {{name_or_path: "builtin:tiny-llama"}}
data:
  sources: [{{path: train.jsonl, format: alpaca}}]
  max_seq_len: 128
lora: {{r: 4, alpha: 8}}
train: {{epochs: 2, pack_tokens: 300, grad_accum: 2, lr: 3.0e-3, log_every: 1, save_every: 3}}
output: {{dir: {out}}}
"""


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_a_token_budget_resumes_exactly_mid_epoch(cli, tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(40, seed=3)))
    for name in ("full", "cut"):
        (tmp_path / f"{name}.yaml").write_text(RECIPE.format(out=json.dumps(str(tmp_path / name))))
    assert cli("train", tmp_path / "full.yaml")[0] == 0
    full = records(tmp_path / "full")
    tokens = [r["tokens"] for r in full]
    assert max(tokens) <= 2 * 300 and len(set(tokens)) > 1  # 2 micro-batches of at most 300 tokens each

    from neftune_cli.train.metrics import MetricsLog

    original = MetricsLog.write

    def stop_at_4(metrics, record):  # a preemption in the middle of the first epoch
        original(metrics, record)
        if record.get("step") == 4:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", stop_at_4)
    assert cli("train", tmp_path / "cut.yaml")[0] == 143
    monkeypatch.undo()
    code, _, err = cli("train", tmp_path / "cut.yaml", "--resume")
    assert code == 0, err
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "cut")) == strip(full)
    assert full[-1]["epoch"] == pytest.approx(2.0)
