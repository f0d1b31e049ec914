"""`neftune sweep`: a grid of runs on the tiny model, answered and compared; a sweep stopped by SIGTERM in the middle of
a run resumes to the same adapters as one that was not; the `--print`ed commands give the same runs; a bad grid
value is exit 2 before anything runs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_run_yaml
from safetensors.torch import load_file

from neftune_cli.demo import tasks as demo_tasks

GRID = ("--grid", "neftune.alpha=0,5")
RUNS = ("neftune.alpha=0", "neftune.alpha=5")


def make_work(folder: Path) -> Path:
    (folder / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(16, seed=3)))
    (folder / "eval.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(4, seed=4, split="eval")))
    prompts = demo_tasks.generate(3, seed=9, split="eval")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"instruction": r["instruction"]}) + "\n"
                                                  for r in prompts))
    (folder / "r.yaml").write_text(tiny_run_yaml("runs", eval_data=True, lora={"r": 4, "alpha": 8}, neftune=None,
                                                  train={"max_steps": 4, "save_every": 2, "keep_last": 10}))
    return folder / "r.yaml"


def neftune(*args: str, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neftune_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def adapters(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(root / name / "final" / "adapter_model.safetensors") for name in RUNS}


def losses(run: Path) -> list:
    return [(r["step"], r.get("loss"), r.get("eval_loss"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_same_runs(root: Path, reference: Path) -> None:
    a, b = adapters(root), adapters(reference)
    for name in RUNS:
        assert losses(root / name) == losses(reference / name), name
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)  # bitwise: CPU, fp32, the same commands


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted sweep of alpha 0 and 5: the runs the others must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    make_work(work)
    done = neftune("sweep", "r.yaml", *GRID, cwd=work)
    assert done.returncode == 0, done.stderr
    return work / "runs"


@pytest.fixture
def work(tmp_path, tiny_model_dir) -> Path:
    make_work(tmp_path)
    return tmp_path


def test_a_2x2_grid_with_answers_finishes_and_is_compared(cli, work, monkeypatch):
    monkeypatch.chdir(work)
    args = ("sweep", "r.yaml", *GRID, "--grid", "train.lr=3e-3,1e-3", "--generate", "prompts.jsonl",
            "--max-new-tokens", "4", "--format", "jsonl")
    code, out, err = cli(*args)
    assert code == 0, err
    names = [f"neftune.alpha={a},train.lr={lr}" for a in (0, 5) for lr in ("3e-3", "1e-3")]
    state = json.loads((work / "runs" / "sweep.json").read_text())
    assert state["grid"] == {"neftune.alpha": ["0", "5"], "train.lr": ["3e-3", "1e-3"]}
    assert list(state["runs"]) == names and {r["state"] for r in state["runs"].values()} == {"done"}
    for name in names:
        run = work / "runs" / name
        assert (run / "final" / "adapter_model.safetensors").is_file()
        recipe = (run / "recipe.yaml").read_text()
        assert f"alpha: {float(name.split('=')[1].split(',')[0])}" in recipe
        answers = (work / "runs" / "answers" / f"{name}.jsonl").read_text().splitlines()
        assert len(answers) == 3 and all(json.loads(a)["output_tokens"] <= 4 for a in answers)
    table = out.strip().splitlines()
    assert table[0].split()[:3] == ["run", "alpha", "scale"] and "diversity" in table[0]
    assert [line.split()[0] for line in table[1:]] == names
    assert [line.split()[1] for line in table[1:]] == ["0", "0", "5", "5"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no loss plot" in err
    else:
        assert (work / "runs" / "loss.png").stat().st_size > 0

    code, out_again, err = cli(*args)  # everything finished: nothing is retrained or answered again
    assert code == 0, err
    assert err.count("done, skipped") == 4 and "running:" not in err
    assert out_again.splitlines()[1:] == out.splitlines()[1:]


def test_a_sigterm_mid_run_resumes_to_the_same_adapters(work, reference):
    ready = work / "paused"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NEFTUNE_TEST_PAUSE_AT": "checkpoint-write-2",
           "NEFTUNE_TEST_PAUSE_FILE": str(ready)}
    sweep = subprocess.Popen([sys.executable, "-m", "neftune_cli", "sweep", "r.yaml", *GRID], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # the first run is writing its step-2 checkpoint
            assert sweep.poll() is None, sweep.communicate()[1]
            assert time.monotonic() < deadline, "the run never reached its checkpoint"
            time.sleep(0.05)
        sweep.send_signal(signal.SIGTERM)  # what a scheduler's preemption sends
        seen = []
        while not any("SIGTERM: finishing this step" in line for line in seen):  # the run got it from the sweep
            line = sweep.stderr.readline()
            assert line, "".join(seen)
            seen.append(line)
        ready.unlink()  # let the checkpoint finish
        _, rest = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    err = "".join(seen) + rest
    assert sweep.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: sweep stopped by SIGTERM during neftune.alpha=0 (its checkpoint is saved); "
                           "continue with: neftune sweep r.yaml --grid neftune.alpha=0,5"), last
    state = json.loads((work / "runs" / "sweep.json").read_text())["runs"]
    assert state["neftune.alpha=0"]["state"] == "interrupted" and state["neftune.alpha=5"]["state"] == "pending"
    first = work / "runs" / "neftune.alpha=0"
    assert (first / "checkpoints" / "step-2" / "meta.json").is_file() and not (first / "final").exists()

    done = neftune(*shlex.split(last.split("continue with: ")[1])[1:], cwd=work)
    assert done.returncode == 0, done.stderr
    assert "--resume" in done.stderr  # the interrupted run resumed, not restarted
    assert_same_runs(work / "runs", reference)


def test_printed_commands_run_one_by_one_give_the_same_runs(cli, work, reference, monkeypatch):
    monkeypatch.chdir(work)
    code, out, err = cli("sweep", "r.yaml", *GRID, "--print")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines == [f"neftune sweep r.yaml --grid neftune.alpha=0,5 --only {name}" for name in RUNS]
    assert not (work / "runs").exists()  # printing runs nothing
    for line in reversed(lines):  # any order, like a job queue
        argv = shlex.split(line)
        done = neftune(*argv[1:], cwd=work)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("done: 4 steps") == 1  # only its own run
    assert_same_runs(work / "runs", reference)
    code, table, err = cli("sweep", "r.yaml", *GRID, "--collect")
    assert code == 0, err
    monkeypatch.chdir(reference.parent)
    code, reference_table, _ = cli("sweep", "r.yaml", *GRID, "--collect")
    columns = table.splitlines()[0].split()
    keep = [columns.index(c) for c in ("run", "alpha", "steps", "train_loss", "eval_loss")]
    assert [[line.split()[i] for i in keep] for line in table.splitlines()] == \
        [[line.split()[i] for i in keep] for line in reference_table.splitlines()]


@pytest.mark.parametrize("grid,message", [
    (["--grid", "neftune.alpha=0,-1"], "error: --grid neftune.alpha=-1: --set neftune.alpha: neftune.alpha: Input "
                                       "should be greater than or equal to 0 (got -1)"),
    (["--grid", "neftune.alhpa=0,5"], "error: --grid neftune.alhpa=0: --set neftune.alhpa: no such key neftune.alhpa"),
    (["--grid", "neftune.alpha"], "error: --grid neftune.alpha: expected KEY=V1,V2,..."),
    (["--grid", "neftune.alpha=0,,5"], "error: --grid neftune.alpha=0,,5: expected KEY=V1,V2,..."),
    (["--grid", "output.dir=a,b"], "error: --grid output.dir: each run's output.dir is the sweep's choice"),
    (["--grid", "neftune.alpha=0,5", "--generate", "prompts.jsonl", "--max-new-tokens", "0"],
     "error: sweep --generate: Invalid value for '--max-new-tokens'"),
    (["--grid", "neftune.alpha=0,5", "--max-new-tokens", "8"], "--max-new-tokens: not an option of sweep"),
])
def test_a_bad_grid_is_exit_2_before_anything_runs(cli, work, monkeypatch, grid, message):
    monkeypatch.chdir(work)
    code, _, err = cli("sweep", "r.yaml", *grid)
    assert code == 2
    assert message in err.strip().splitlines()[-1], err
    assert not (work / "runs").exists()


def test_a_sweep_will_not_share_a_folder(cli, work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "runs").mkdir()
    (work / "runs" / "notes.txt").write_text("mine")
    code, _, err = cli("sweep", "r.yaml", *GRID)
    assert code == 2 and "holds 'notes.txt', which is not part of this sweep" in err
    assert (work / "runs" / "notes.txt").read_text() == "mine"


def test_nproc_and_generate_options_pass_through_to_each_run(cli, work, monkeypatch):
    from neftune_cli.cli import sweep as sweeps

    monkeypatch.chdir(work)
    code, out, err = cli("sweep", "r.yaml", "--set", "train.lr=1e-3", *GRID, "--generate", "prompts.jsonl",
                         "--max-new-tokens", "16", "--nproc", "2", "--print")
    assert code == 0, err
    assert out.splitlines()[0] == ("neftune sweep r.yaml --set train.lr=1e-3 --grid neftune.alpha=0,5 --generate "
                                   "prompts.jsonl --max-new-tokens 16 --nproc 2 --only neftune.alpha=0")
    plan = sweeps.plan(Path("r.yaml"), ["train.lr=1e-3"], ["neftune.alpha=0,5"], Path("prompts.jsonl"),
                       ["--max-new-tokens", "16"], 2)
    first = plan.combinations[0]
    assert sweeps.train_command(plan, first) == [
        "train", "r.yaml", "--set", "train.lr=1e-3", "--set", "neftune.alpha=0", "--set",
        'output.dir="runs/neftune.alpha=0"', "--nproc", "2"]
    assert sweeps.generate_command(plan, first) == [
        "generate", "runs/neftune.alpha=0", "--prompts", "prompts.jsonl", "--out", "runs/answers/neftune.alpha=0.json",
        "--overwrite", "--max-new-tokens", "16"]


def test_grid_values_keep_commas_inside_brackets_and_quotes():
    from neftune_cli.cli.sweep import split_values

    assert split_values("0,5,10") == ["0", "5", "10"]
    assert split_values("[q_proj,v_proj],all-linear,'a,b',{x: 1, y: 2}") == [
        "[q_proj,v_proj]", "all-linear", "'a,b'", "{x: 1, y: 2}"]


def test_a_sweep_will_not_go_inside_a_training_run(cli, work, monkeypatch):
    monkeypatch.chdir(work)
    assert cli("train", "r.yaml", "--set", "train.max_steps=1")[0] == 0  # output.dir is now a run
    code, _, err = cli("sweep", "r.yaml", *GRID)
    assert code == 2 and "output.dir runs is a training run; a sweep puts its runs inside output.dir" in err
    assert not (work / "runs" / "sweep.json").exists()
