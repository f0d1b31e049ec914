"""torchrun on the CPU (gloo): 2 processes train exactly as 1 does, for DDP and FSDP2, pad and pack; rank-0 I/O,
exact resume after SIGTERM, a crash on one rank, the batch arithmetic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import save_with_tokenizer
from safetensors.torch import load_file

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.io.errors import UsageError
from neftune_cli.train import parallel

RECIPE = """\
model: {{name_or_path: "builtin:tiny-llama"}}
data:
  sources: [{{path: train.jsonl, format: alpaca}}]
  eval_sources: [{{path: eval.jsonl, format: alpaca}}]
  max_seq_len: 128
lora: {{r: 4, alpha: 8, dropout: 0}}
neftune: {{alpha: 0}}
train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 3.0e-3, log_every: 1, save_every: 2,
         keep_last: 10}}
output: {{dir: {out}}}
"""


@pytest.fixture
def work(tmp_path, tiny_model_dir):
    # 44 examples: 11 micro-batches of 4, so the last step of the epoch has 1 and one rank must stand by
    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(44, seed=3)))
    (tmp_path / "eval.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(8, seed=4, split="eval")))
    return tmp_path


def recipe(work: Path, out: str, steps: int = 3) -> Path:
    path = work / f"{out}.yaml"
    path.write_text(RECIPE.format(out=json.dumps(str(work / out)), steps=steps))
    return path


def torchrun(nproc: int, *args: str, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "neftune_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def losses(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert [x[0] for x in la] == [x[0] for x in lb]
    for (_, loss_a, eval_a), (_, loss_b, eval_b) in zip(la, lb, strict=True):
        assert (loss_a is None) == (loss_b is None) and (eval_a is None) == (eval_b is None)
        assert loss_a is None or loss_b == pytest.approx(loss_a, rel=tol)
        assert eval_a is None or eval_b == pytest.approx(eval_a, rel=tol)
    wa = load_file(a / "final" / "adapter_model.safetensors")
    wb = load_file(b / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "batching"), [("ddp", "pack"), ("ddp", "pad"), ("fsdp", "pack"),
                                              ("ddp", "pack_tokens=300"), ("fsdp", "pack_tokens=300")])
def test_two_processes_train_as_one(cli, work, mode, batching):
    setting = f"train.{batching}" if "=" in batching else f"train.batching={batching}"
    one = recipe(work, "one", steps=7)  # the epoch's 6th step is short: a rank stands by with a zero-weight batch
    assert cli("train", one, "--set", setting)[0] == 0
    done = torchrun(2, "train", recipe(work, "two", steps=7), "--set", setting, "--set", f"train.distributed={mode}")
    assert done.returncode == 0, done.stderr
    assert_same_run(work / "one", work / "two")
    two = work / "two"
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6", "step-7"]
    assert not list(two.rglob(".tmp-*"))
    assert done.stdout.count("done: 7 steps") == 1  # rank 0 alone speaks
    assert "[rank 1]" not in done.stderr


@pytest.mark.slow
def test_sigterm_to_all_ranks_then_resume_equals_an_uninterrupted_run(work):
    assert torchrun(2, "train", recipe(work, "full", steps=40)).returncode == 0
    cut = recipe(work, "cut", steps=40)
    proc = torchrun(2, "train", cut, wait=False)
    deadline = time.monotonic() + 300
    while not (work / "cut" / "checkpoints" / "step-2" / "meta.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to every rank
    _, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM" in err and "Resume with:" in err
    assert not (work / "cut" / "final").exists()
    done = torchrun(2, "train", cut, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(work / "full", work / "cut", tol=1e-6)


@pytest.mark.slow
def test_a_crash_on_one_rank_stops_all_with_one_error(work):
    done = nproc("train", recipe(work, "run", steps=6), env={"NEFTUNE_TEST_CRASH_AT": "step-4@1"})
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: [rank 1] RuntimeError: fault injected at step-4"], done.stderr
    assert (work / "run" / "checkpoints" / "step-2" / "meta.json").is_file()


@pytest.mark.slow
def test_noise_under_two_processes_keeps_the_paper_norm(work):
    path = recipe(work, "noisy", steps=2)
    path.write_text(path.read_text().replace("neftune: {alpha: 0}", "neftune: {alpha: 5}"))
    done = torchrun(2, "train", path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (work / "noisy" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["noise_norm"] for r in records if "noise_norm" in r]
    assert norms and all(n == pytest.approx(5 / 3**0.5, rel=0.1) for n in norms)


def nproc(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`neftune ... --nproc 2`: the wrapper around torchrun that keeps our exit codes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "neftune_cli", *map(str, args), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=600)


def test_resume_on_another_number_of_processes_is_refused(cli, work):
    path = recipe(work, "run", steps=2)
    assert cli("train", path)[0] == 0
    done = nproc("train", path, "--resume")
    assert done.returncode == 2  # torchrun itself would say 1
    assert "written by 1 process(es); resume with the same number (this run has 2)" in done.stderr
    # our error line, not torchrun's ChildFailedError traceback after it (issue 21)
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr


def test_the_global_batch_must_divide_among_the_processes():
    parallel.check_batch(4, 8, parallel.Dist(0, 2, 0))
    with pytest.raises(UsageError, match="train.grad_accum 3 does not divide among 2 processes"):
        parallel.check_batch(3, 8, parallel.Dist(0, 2, 0))


def test_each_rank_takes_its_share_of_a_step():
    step = [[0, 1], [2, 3], [4, 5], [6, 7]]
    shares = [parallel.my_share(step, parallel.Dist(r, 2, r)) for r in range(2)]
    assert shares == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert sorted(sum(shares, [])) == step
    assert parallel.my_share(step, parallel.SINGLE) == step


def test_nproc_runs_torchrun(work):
    done = nproc("train", recipe(work, "run", steps=1))
    assert done.returncode == 0, done.stderr
    assert "running: -m torch.distributed.run --standalone --nproc_per_node=2 -m neftune_cli train" in done.stderr
    assert "on each of 2 processes (ddp)" in done.stderr


@pytest.mark.slow
def test_fsdp_resume_after_a_crash_equals_an_uninterrupted_run(work):
    fsdp = ["--set", "train.distributed=fsdp"]
    assert torchrun(2, "train", recipe(work, "full", steps=6), *fsdp).returncode == 0
    cut = recipe(work, "cut", steps=6)
    crashed = torchrun(2, "train", cut, *fsdp, env={"NEFTUNE_TEST_CRASH_AT": "step-4@1"})
    assert crashed.returncode != 0 and (work / "cut" / "checkpoints" / "step-2" / "meta.json").is_file()
    done = torchrun(2, "train", cut, *fsdp, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(work / "full", work / "cut", tol=1e-6)


def peak_rss_by_rank(proc: subprocess.Popen) -> dict[int, int]:
    """Poll torchrun's worker processes for their peak resident memory (VmHWM, bytes) until torchrun exits."""
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != proc.pid:
                    continue
                environ = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in kv)
                status = (stat.parent / "status").read_text()
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
            rank = int(environ.get("RANK", -1))
            peaks[rank] = max(peaks.get(rank, 0), hwm)
        time.sleep(0.2)
    return peaks


@pytest.mark.slow
def test_fsdp_never_holds_the_whole_model_on_a_worker(work, tiny_model_dir):
    """The FSDP model is built on the meta device on every rank and gets its weights in shards from rank 0 (which
    alone loads them, into host memory): rank 1's memory grows by about half the model, not by all of it. On a
    CPU (gloo) host memory stands in for GPU memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2560, num_hidden_layers=24,
                         num_attention_heads=12, num_key_value_heads=12, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # 0.8 GB in float32
    folder = save_with_tokenizer(model, work / "big", tiny_model_dir)
    del model

    def peaks(model: str) -> dict[int, int]:
        path = recipe(work, f"run-{len(list(work.glob('run-*.yaml')))}", steps=1)
        path.write_text(path.read_text().replace('"builtin:tiny-llama"', json.dumps(model)))
        # a fixed mmap threshold: freed tensors go back to the system, so the peak counts tensors, not malloc's cache
        proc = torchrun(2, "train", path, "--set", "train.distributed=fsdp", "--set", "data.eval_sources=[]",
                        "--set", "train.grad_accum=2", "--set", "train.micro_batch_size=1",
                        env={"MALLOC_MMAP_THRESHOLD_": "1000000"}, wait=False)
        found = peak_rss_by_rank(proc)
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        return found

    libraries, big = peaks("builtin:tiny-llama"), peaks(str(folder))  # the same run with a model of ~0 bytes
    growth = {rank: big[rank] - libraries[rank] for rank in (0, 1)}
    assert growth[1] < size, (growth, size)  # half the model, a few layers gathered at a time, the activations
    assert growth[0] < 1.75 * size, (growth, size)  # the host copy it sends from, and its own half
