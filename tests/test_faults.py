"""Fault injection: bad inputs and interrupted writes, as a careful adversary would try them.

Each case asserts the exit code, one `error:` line on stderr naming the culprit (no traceback), and the file
system afterwards: the user's files intact, no temporary debris left, the run resumable. The merge's own faults
are in test_merge_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.train.step import CausalLMLoss

RECIPE = """\
model:
  name_or_path: builtin:tiny-llama
data:
  sources:
    - path: train.jsonl
      format: alpaca
  max_seq_len: 128
lora: {r: 4, alpha: 8}
train:
  max_steps: 4
  micro_batch_size: 4
  lr: 3.0e-3
  log_every: 1
  save_every: 1
  keep_last: 1
output:
  dir: {out}
"""


@pytest.fixture
def work(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(24, seed=3)))
    return tmp_path


def recipe(folder: Path, out: str | Path | None = None, name: str = "r.yaml", text: str = RECIPE) -> Path:
    path = folder / name
    path.write_text(text.replace("{out}", json.dumps(str(folder / "run" if out is None else out))))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'nothing changed' is this staying equal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(err: str, *names: str) -> str:
    """The single `error:` line of stderr, which must name each of `names`; no traceback anywhere."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def no_debris(folder: Path) -> None:
    assert not [p for p in folder.rglob(".tmp-*")], list(folder.rglob(".tmp-*"))


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"non-JSON number {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --- 1. --overwrite never deletes what is not one of our runs ------------------------------------------------


def test_overwrite_refuses_the_current_directory(cli, work, monkeypatch):
    (work / "notes.txt").write_text("mine")
    path = recipe(work)
    before = snapshot(work)
    monkeypatch.chdir(work)
    code, _, err = cli("train", path, "--set", "output.dir=.", "--overwrite")
    assert code == 2
    line = one_error(err, "output.dir", "not part of a neftune run")
    assert "--overwrite" not in line  # never point at the destructive flag for a folder that is not a run
    assert snapshot(work) == before


def test_overwrite_refuses_the_recipes_own_folder(cli, work):
    path = recipe(work, out=work)
    before = snapshot(work)
    code, _, err = cli("train", path, "--overwrite")
    assert code == 2
    one_error(err, str(work))
    assert snapshot(work) == before


def test_empty_output_dir_is_a_recipe_error(cli, work):
    code, _, err = cli("validate", recipe(work, out=""))
    assert code == 2
    one_error(err, "output.dir")


def test_overwrite_deletes_a_run_but_not_a_file_put_into_it(cli, work):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=1")[0] == 0
    code, _, err = cli("train", path, "--set", "train.max_steps=1")
    assert code == 2 and "--resume" in one_error(err, "already holds a run")
    assert cli("train", path, "--set", "train.max_steps=2", "--overwrite")[0] == 0
    assert [r["step"] for r in strict_json_lines(work / "run" / "metrics.jsonl")] == [1, 2]

    (work / "run" / "my-eval.txt").write_text("keep me")
    before = snapshot(work / "run")
    code, _, err = cli("train", path, "--overwrite")
    assert code == 2
    one_error(err, "my-eval.txt")
    assert snapshot(work / "run") == before


def test_output_dir_that_is_a_file_or_under_one(cli, work):
    (work / "afile").write_text("x")
    for out in (work / "afile", work / "afile" / "run"):
        code, _, err = cli("train", recipe(work, out=out))
        assert code == 2
        one_error(err, "output.dir", str(out))
    assert (work / "afile").read_text() == "x"


def test_output_dir_not_writable(cli, work, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = cli("train", recipe(work))
    assert code == 2
    one_error(err, "output.dir", "Read-only file system")


# --- 2. data export never overwrites the recipe, the data, or an existing file -------------------------------


@pytest.mark.parametrize("target", ["train.jsonl", "r.yaml"])
def test_export_refuses_an_input_of_the_recipe(cli, work, target):
    path = recipe(work)
    before = snapshot(work)
    code, _, err = cli("data", "export", path, work / target, "--overwrite")
    assert code == 2
    one_error(err, target, "input of this command")
    assert snapshot(work) == before


def test_export_target_rules(cli, work):
    path = recipe(work)
    code, _, err = cli("data", "export", path, work)
    assert code == 2
    one_error(err, "is a folder")
    (work / "old.jsonl").write_text("old")
    code, _, err = cli("data", "export", path, work / "old.jsonl")
    assert code == 2 and (work / "old.jsonl").read_text() == "old"
    one_error(err, "old.jsonl", "--overwrite")
    assert cli("data", "export", path, work / "old.jsonl", "--overwrite")[0] == 0
    assert len(strict_json_lines(work / "old.jsonl")) == 24


# --- 3. non-finite gradients are never applied, saved or named good -----------------------------------------


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (an fp16 overflow, a bad kernel)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradients_with_a_finite_loss(cli, work, monkeypatch):
    calls = {"n": 0}
    original = CausalLMLoss.forward

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += self.training
        return losses._replace(loss=_NanGrad.apply(losses.loss)) if self.training and calls["n"] >= 3 else losses

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    code, _, err = cli("train", recipe(work))  # keep_last 1: the last good checkpoint must survive
    assert code == 1
    one_error(err, "gradient norm is nan at step 3", "step-2")
    run = work / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    weights = load_file(run / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == [1, 2]


def test_non_finite_metrics_are_written_as_null(tmp_path):
    from data_helpers import recipe as some_recipe

    from neftune_cli.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, some_recipe(["unused.jsonl"]))
    log.write({"step": 1, "eval_loss": float("inf"), "loss": float("nan"), "lr": 0.1})
    log.close()
    assert strict_json_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "eval_loss": None, "loss": None, "lr": 0.1}]


# --- 4. --resume of a finished run changes nothing -----------------------------------------------------------


def test_resume_of_a_finished_run_is_a_no_op(cli, work):
    path = recipe(work)
    assert cli("train", path)[0] == 0
    (work / "run" / "final" / "README.md").write_text("my model card")
    before = snapshot(work / "run")
    code, out, err = cli("train", path, "--resume")
    assert code == 0, err
    assert "nothing to do" in out
    after = snapshot(work / "run")
    after.pop(".lock"), before.pop(".lock")  # who last held the run dir: a record of the lock, not of the run
    assert after == before


# --- 5. and 9. a second train on the same run dir; kill -9 in the middle of a checkpoint --------------------


def start_paused(path: Path, pause_at: str, ready: Path, *extra: str, command: str = "train") -> subprocess.Popen:
    env = {**os.environ, "NEFTUNE_TEST_PAUSE_AT": pause_at, "NEFTUNE_TEST_PAUSE_FILE": str(ready)}
    cmd = [sys.executable, "-m", "neftune_cli", *command.split(), str(path), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the process never reached the pause point"
        time.sleep(0.05)
    return proc


def test_a_second_train_on_a_held_run_dir_and_kill_9_during_a_checkpoint(cli, work):
    path = recipe(work)
    holder = start_paused(path, "checkpoint-write-3", work / "ready")
    try:
        code, _, err = cli("train", path, "--overwrite")
        assert code == 2
        one_error(err, "in use by", f"pid {holder.pid}")
        os.kill(holder.pid, signal.SIGKILL)  # in the middle of writing checkpoint 3
        holder.communicate(timeout=60)
    finally:
        holder.kill()
    run = work / "run"
    assert list((run / "checkpoints").glob(".tmp-step-3-*")), "the kill should leave a half-written checkpoint"
    assert (run / "checkpoints" / "step-2" / "meta.json").is_file()

    code, _, err = cli("train", path, "--resume")  # the lock died with its process
    assert code == 0, err
    assert "removed 1 temporary file(s) left by an interrupted run" in err
    no_debris(run)
    assert [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "final" / "adapter_model.safetensors").is_file()


# --- 6. resource bounds --------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(cli, work):
    path = work / "bomb.yaml"
    path.write_text(BOMB + "model: {name_or_path: builtin:tiny-llama}\ndata: {sources: [{path: train.jsonl}]}\n"
                    "output: {dir: run}\n")
    code, _, err = cli("validate", path)
    assert code == 2 and len(err) < 500
    one_error(err, "bomb.yaml", "expands to more than")


def test_an_alias_bomb_inside_rope_scaling(cli, work):
    path = work / "rope.yaml"
    small = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    path.write_text(recipe(work).read_text().replace("model:\n", small.replace("a:", "x-a:").replace("b:", "x-b:")
                                                     + "model:\n  rope_scaling: {type: linear, factor: 2, "
                                                     "short_factor: *b}\n"))
    code, _, err = cli("validate", path)
    assert code == 2 and len(err) < 2000
    assert "Traceback" not in err


# --- 7. the user's mistakes are exit 2 with one line, never a raw exception ----------------------------------


@pytest.mark.parametrize(
    ("content", "culprit"),
    [("", "holds no records"), ("[]", "holds no records"), ("{bad json\n{also bad\n", "no usable training examples")],
)
def test_empty_data(cli, work, content, culprit):
    suffix = ".json" if content == "[]" else ".jsonl"
    (work / f"d{suffix}").write_text(content)
    text = RECIPE.replace("train.jsonl", f"d{suffix}").replace("max_seq_len: 128", "max_seq_len: 128\n"
                                                               "  on_bad_record: skip")
    code, _, err = cli("data", "stats", recipe(work, text=text))
    assert code == 2
    one_error(err, culprit)


def test_unreadable_data_file(cli, work, monkeypatch):
    import neftune_cli.data.sources as sources

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(sources, "_file_identity", denied)
    code, _, err = cli("data", "stats", recipe(work))
    assert code == 2
    one_error(err, "train.jsonl", "Permission denied")


@pytest.mark.parametrize(
    ("setting", "culprit"),
    [
        ("model.rope_scaling={foo: bar}", "model.rope_scaling"),
        ("model.rope_scaling={type: linear}", "model.rope_scaling.factor"),
        ("model.rope_scaling={type: yarn, factor: 2, beta_fast: .nan}", "model.rope_scaling.beta_fast"),
        ("train.lr=1e309", "train.lr"),
        ("neftune.alpha=.inf", "neftune.alpha"),
        ("train=5", "--set train"),
        ("data.template=custom", "data"),
    ],
)
def test_bad_values(cli, work, setting, culprit):
    code, _, err = cli("validate", recipe(work), "--set", setting)
    assert code == 2
    one_error(err, culprit)
    if setting.startswith("train="):
        assert "r.yaml" not in err  # the --set made it, not the file


def test_rope_scaling_that_the_model_config_rejects(cli, work):
    # llama3 scaling needs its frequency factors, in transformers 4.x and 5.x alike
    code, _, err = cli("train", recipe(work), "--set", "model.rope_scaling={type: llama3, factor: 8}")
    assert code == 2
    one_error(err, "model.rope_scaling", "low_freq_factor")
    code, _, err = cli("train", recipe(work, out=work / "ok"), "--set", "model.rope_scaling={type: linear, factor: 2}",
                       "--set", "train.max_steps=1")
    assert code == 0, err


# --- 8. damaged files: named, and worked around where we can -------------------------------------------------


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.pt"])
def test_resume_falls_back_from_a_damaged_checkpoint(cli, work, damaged):
    path = recipe(work, text=RECIPE.replace("keep_last: 1", "keep_last: 3"))
    assert cli("train", path, "--set", "train.max_steps=3")[0] == 0
    file = work / "run" / "checkpoints" / "step-3" / damaged
    file.write_bytes(file.read_bytes()[:100])
    code, _, err = cli("train", path, "--set", "train.max_steps=3", "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    assert f"step-3/{damaged}: unreadable" in err and "trying the checkpoint before it" in err
    assert "resume: from" in err and "step-2" in err


def test_all_checkpoints_damaged(cli, work):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=2")[0] == 0
    (work / "run" / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"junk")
    code, _, err = cli("train", path, "--set", "train.max_steps=2", "--resume")
    assert code == 2
    assert "no intact checkpoint" in err and "Traceback" not in err


def test_damaged_data_cache_is_rebuilt(cli, work, neftune_cache):
    path = recipe(work)
    assert cli("data", "stats", path)[0] == 0
    arrows = sorted((neftune_cache / "data").glob("*/train/*.arrow"), key=lambda p: p.stat().st_mtime)
    arrows[-1].write_bytes(arrows[-1].read_bytes()[:64])
    code, out, err = cli("data", "stats", path)
    assert code == 0, err
    assert "is damaged" in err and "tokenizing again" in err
    assert cli("data", "stats", path)[2].count("cache hit") == 1  # the rebuilt entry is whole


def test_disk_full_while_saving_a_checkpoint(cli, work, monkeypatch):
    import neftune_cli.train.checkpoint as checkpoint

    original = checkpoint.save_model

    def full(model, folder, *rest):
        original(model, folder, *rest)
        if folder.name.startswith(".tmp-step-2"):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "adapter_model.safetensors"))

    monkeypatch.setattr(checkpoint, "save_model", full)
    code, _, err = cli("train", recipe(work, text=RECIPE.replace("keep_last: 1", "keep_last: 3")))
    assert code == 1
    one_error(err, "disk full while writing", "step-2")
    no_debris(work / "run")
    assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == ["step-1"]


# --- messages that used to mislead ---------------------------------------------------------------------------


def test_jinja_syntax_error_names_the_template_not_a_record(cli, work):
    text = RECIPE.replace("max_seq_len: 128", "max_seq_len: 128\n  template: custom\n"
                                              "  chat_template: \"{% for m in messages %}{{ m.content }}\"")
    code, _, err = cli("validate", recipe(work, text=text))
    assert code == 2
    line = one_error(err, "data.chat_template", "jinja syntax error")
    assert "on_bad_record" not in line and "line 1" not in line.split("jinja")[0]


def test_recipe_path_that_is_a_folder(cli, work):
    code, _, err = cli("validate", work)
    assert code == 2
    one_error(err, "is a folder")


def test_warnings_for_likely_mistakes(cli, work):
    path = recipe(work, text=RECIPE.replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 1.0e-3\n"))
    code, _, err = cli("validate", path, "--set", "data.max_seq_len=4096")
    assert code == 0, err
    assert "duplicate key" in err and "'lr'" not in err and '"lr"' in err
    assert "data.max_seq_len 4096 is beyond the model's 1024 positions" in err


def test_resume_of_a_run_saved_before_a_recipe_key_existed(cli, work):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=2")[0] == 0
    meta_file = work / "run" / "checkpoints" / "step-2" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["recipe"]["train"]["pack_tokens"]  # as an older version wrote it: the run used the default
    meta_file.write_text(json.dumps(meta))
    code, _, err = cli("train", path, "--set", "train.max_steps=3", "--resume", "--force")
    assert code == 0, err
    assert "pack_tokens" not in err  # only the real change is named
    assert "train.max_steps: 2 -> 3" in err


# --- issue 21: one output policy for every command that writes (io/outputs.py) ------------------------------


def prompts(folder: Path, text: str = "Count the items: a, b") -> Path:
    path = folder / "prompts.jsonl"
    path.write_text(json.dumps({"instruction": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


GENERATE = ("--max-new-tokens", "3", "--limit", "1")


def test_generate_never_writes_onto_an_input_a_run_or_an_existing_file(cli, work):
    assert cli("train", recipe(work), "--set", "train.max_steps=1")[0] == 0
    asked = prompts(work)
    (work / "answers.json").write_text("my answers")
    before = snapshot(work)
    cases = [(asked, "input of this command"), (work / "run" / "final" / "adapter_model.safetensors", "inside"),
             (work / "run" / "answers.json", "inside"), (work / "answers.json", "--overwrite")]
    for target, culprit in cases:
        code, _, err = cli("generate", work / "run", "--prompts", asked, "--out", target, *GENERATE)
        assert code == 2, err
        one_error(err, str(target), culprit)
    for target in cases[:3]:  # --overwrite replaces only a file outside our folders that is no input
        code, _, err = cli("generate", work / "run", "--prompts", asked, "--out", target[0], "--overwrite", *GENERATE)
        assert code == 2, err
    assert snapshot(work) == before
    code, _, err = cli("generate", work / "run", "--prompts", asked, "--out", work / "answers.json", "--overwrite",
                       *GENERATE)
    assert code == 0, err
    assert json.loads((work / "answers.json").read_text())[0]["instruction"] == "Count the items: a, b"


def test_plot_refuses_an_existing_png_without_overwrite(cli, work):
    assert cli("train", recipe(work), "--set", "train.max_steps=1")[0] == 0
    png = work / "mine.png"
    png.write_bytes(b"my picture")
    code, _, err = cli("plot", work / "run", "--out", png)
    assert code == 2 and png.read_bytes() == b"my picture"
    one_error(err, str(png), "--overwrite")
    code, _, err = cli("plot", work / "run", "--out", work / "run" / "curves.png")
    assert code == 2 and not (work / "run" / "curves.png").exists()
    one_error(err, "inside")
    assert cli("plot", work / "run", "--out", png, "--overwrite")[0] == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    no_debris(work)


def test_merge_out_inside_a_run_or_over_a_users_folder_is_refused(cli, work):
    assert cli("train", recipe(work), "--set", "train.max_steps=1")[0] == 0
    before = snapshot(work)
    for out in (work / "run" / "final" / "merged", work / "run" / "merged"):
        code, _, err = cli("merge", work / "run", "--out", out, "--no-verify")
        assert code == 2, err
        one_error(err, str(out), "inside")
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")  # another model's config
    before = snapshot(work)
    code, _, err = cli("merge", work / "run", "--out", mine, "--no-verify", "--overwrite")
    assert code == 2
    one_error(err, str(mine), "neftune did not write", "--overwrite")
    assert snapshot(work) == before


@pytest.mark.parametrize("where", ["final", "checkpoints/step-2"])
def test_overwrite_and_resume_refuse_a_users_file_below_the_top(cli, work, where):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=2")[0] == 0
    (work / "run" / where / "notes.txt").write_text("keep me")
    before = snapshot(work / "run")
    for flags in (["--overwrite"], ["--resume", "--force"]):
        code, _, err = cli("train", path, "--set", "train.max_steps=3", *flags)
        assert code == 2, err
        one_error(err, f"{where}/notes.txt")
    before.pop(".lock")
    after = snapshot(work / "run")
    after.pop(".lock")
    assert after == before


def test_overwrite_of_a_run_whose_checkpoints_is_a_symlink_deletes_nothing(cli, work):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=1")[0] == 0
    elsewhere = work / "elsewhere"
    (work / "run" / "checkpoints").rename(elsewhere)
    (work / "run" / "checkpoints").symlink_to(elsewhere)
    before = snapshot(work)
    code, _, err = cli("train", path, "--overwrite")
    assert code == 2
    one_error(err, "checkpoints")
    assert snapshot(work) == before and (work / "run" / "checkpoints").is_symlink()


def test_a_merged_model_moved_into_final_is_not_deleted_by_overwrite(cli, work):
    """Merging into a run is refused; a merged model put there by hand is ours but not this run's: train
    --overwrite refuses, naming it, rather than delete it."""
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=1")[0] == 0
    assert cli("merge", work / "run", "--out", work / "merged", "--no-verify")[0] == 0
    (work / "merged").rename(work / "run" / "final" / "merged")
    before = snapshot(work / "run")
    code, _, err = cli("train", path, "--overwrite")
    assert code == 2
    one_error(err, "final/merged")
    assert snapshot(work / "run").keys() == before.keys()


def test_resume_with_nothing_to_resume_creates_no_run_dir(cli, work):
    code, _, err = cli("train", recipe(work), "--resume")
    assert code == 2
    one_error(err, "--resume", str(work / "run"))
    assert not (work / "run").exists()


def test_foreign_entries_at_every_depth(tmp_path):
    from neftune_cli.io.atomic import atomic_dir
    from neftune_cli.io.outputs import foreign_entries

    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
    assert foreign_entries(tmp_path / "m") == []
    (tmp_path / "m" / "sub" / "user.txt").write_text("u")
    (tmp_path / "m" / "new").mkdir()
    (tmp_path / "m" / "link").symlink_to(tmp_path)
    assert foreign_entries(tmp_path / "m") == ["link", "new", "sub/user.txt"]
    with pytest.raises(Exception, match="link.*neftune did not write"):
        with atomic_dir(tmp_path / "m"):
            pass
    assert (tmp_path / "m" / "sub" / "user.txt").exists()


# --- issue 21: runs the tool made are accepted by the tool ---------------------------------------------------


def test_generate_and_eval_of_a_full_fine_tuning_run_and_its_checkpoint(cli, work):
    path = recipe(work, text=RECIPE.replace("lora: {r: 4, alpha: 8}", "finetune: full"))
    assert cli("train", path, "--set", "train.max_steps=1")[0] == 0
    assert __import__("yaml").safe_load((work / "run" / "recipe.yaml").read_text())["lora"] is None
    for model in (work / "run", work / "run" / "checkpoints" / "step-1"):
        code, _, err = cli("generate", model, "--prompts", prompts(work), "--out", work / "a.json", "--overwrite",
                           *GENERATE)
        assert code == 0, err
        code, _, err = cli("eval", model, "--data", work / "train.jsonl")
        assert code == 0, err
    # a run recorded before the lora section was dropped: read back as it ran
    saved = __import__("yaml").safe_load((work / "run" / "recipe.yaml").read_text())
    saved["lora"] = {"r": 16}
    (work / "run" / "recipe.yaml").write_text(__import__("yaml").safe_dump(saved))
    code, _, err = cli("eval", work / "run", "--data", work / "train.jsonl")
    assert code == 0, err


def test_a_line_separator_in_a_record_round_trips_through_clean_generate_and_eval(cli, work):
    text = "Count the items:\u2028a, b\u2029c\x85"
    source = work / "in.jsonl"
    source.write_text(json.dumps({"instruction": text, "input": "", "output": "three items"}, ensure_ascii=False)
                      + "\n", encoding="utf-8")
    code, _, err = cli("data", "clean", source, "--out", work / "clean.jsonl", "--min-words", "1")
    assert code == 0, err
    assert "\u2028" in (work / "clean.jsonl").read_text(encoding="utf-8")  # written raw, one line
    assert cli("train", recipe(work), "--set", "train.max_steps=1")[0] == 0
    code, _, err = cli("generate", work / "run", "--prompts", work / "clean.jsonl", "--out", work / "a.jsonl",
                       "--format", "jsonl", *GENERATE)
    assert code == 0, err
    assert json.loads((work / "a.jsonl").read_text(encoding="utf-8").split("\n")[0])["instruction"] == text
    answers = work / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "x", "output": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    code, _, err = cli("eval", work / "run", "--answers", answers)
    assert code == 0, err


def test_resume_after_moving_the_project_folder(cli, work, tmp_path_factory):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=2")[0] == 0
    import shutil

    moved = tmp_path_factory.mktemp("moved") / "project"
    shutil.move(work, moved)
    shutil.rmtree(moved / "run" / "final")  # as if stopped before the end
    code, _, err = cli("train", recipe(moved), "--set", "train.max_steps=2", "--resume")
    assert code == 0, err
    assert (moved / "run" / "final" / "adapter_model.safetensors").is_file()
    (moved / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(24, seed=4)))
    shutil.rmtree(moved / "run" / "final")
    code, _, err = cli("train", recipe(moved), "--set", "train.max_steps=2", "--resume")
    assert code == 2 and "the data changed" in one_error(err)


def test_a_model_folder_that_is_not_there_is_named_by_every_command_that_serves(cli, work):
    missing = work / "no-such-model"
    for command in (("generate", missing, "--prompts", prompts(work), "--out", work / "a.json", *GENERATE),
                    ("eval", missing, "--data", work / "train.jsonl"), ("chat", missing)):
        code, _, err = cli(*command)
        assert code == 2, (command, err)
        one_error(err, str(missing), "folder not found")


def test_resume_after_moving_a_project_with_its_model_folder(cli, work, tiny_model_dir, tmp_path_factory):
    import shutil

    shutil.copytree(tiny_model_dir, work / "model")
    text = RECIPE.replace("builtin:tiny-llama", "model")  # resolved against the recipe's folder
    assert cli("train", recipe(work, text=text), "--set", "train.max_steps=2")[0] == 0
    moved = tmp_path_factory.mktemp("moved") / "project"
    shutil.move(work, moved)
    generate = ("generate", moved / "run", "--prompts", prompts(moved), "--out", moved / "a.json", *GENERATE)
    code, _, err = cli(*generate)  # the run records where its base model was
    assert code == 2 and str(work / "model") in one_error(err, str(moved / "run" / "recipe.yaml"), "folder not found")
    shutil.rmtree(moved / "run" / "final")
    code, _, err = cli("train", recipe(moved, text=text), "--set", "train.max_steps=2", "--resume")
    assert code == 0, err
    code, _, err = cli(*generate)  # a resume records where the model and data are now
    assert code == 0, err
    # another model in that folder is a change, named
    config = json.loads((moved / "model" / "config.json").read_text())
    (moved / "model" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] / 10}))
    shutil.rmtree(moved / "run" / "final")
    code, _, err = cli("train", recipe(moved, text=text), "--set", "train.max_steps=2", "--resume")
    assert code == 2 and "model.name_or_path" in one_error(err)


# --- issue 21: exit 2 with one line where the user must change something ------------------------------------


def test_a_target_under_a_file_is_exit_2_for_every_command_that_writes(cli, work):
    path = recipe(work)
    assert cli("train", path, "--set", "train.max_steps=1")[0] == 0
    (work / "afile").write_text("x")
    under = work / "afile"
    commands = [
        ("generate", work / "run", "--prompts", prompts(work), "--out", under / "a.json", *GENERATE),
        ("plot", work / "run", "--out", under / "c.png"),
        ("data", "export", path, under / "t.jsonl"),
        ("data", "clean", work / "train.jsonl", "--out", under / "c.jsonl"),
        ("data", "clean", work / "train.jsonl", "--dry-run", "--report", under / "r.json"),
        ("merge", work / "run", "--out", under / "m", "--no-verify"),
    ]
    for command in commands:
        code, _, err = cli(*command)
        assert code == 2, (command, err)
        one_error(err, str(under))
    assert (work / "afile").read_text() == "x"


def test_a_read_only_target_is_exit_2(cli, work, monkeypatch):
    path = recipe(work)
    real = Path.open

    def read_only(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name.startswith(".tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    code, _, err = cli("data", "export", path, work / "t.jsonl")
    assert code == 2
    one_error(err, "t.jsonl", "Read-only file system")


def model_copy(tiny_model_dir: Path, to: Path, keep_weights: bool) -> Path:
    import shutil

    shutil.copytree(tiny_model_dir, to, ignore=None if keep_weights else shutil.ignore_patterns("*.safetensors"))
    (to / ".neftune-manifest.json").unlink(missing_ok=True)
    return to


@pytest.mark.parametrize("damage", ["no weights", "truncated"])
def test_a_model_folder_without_whole_weights_is_exit_2(cli, work, tiny_model_dir, damage):
    model = model_copy(tiny_model_dir, work / "model", keep_weights=damage == "truncated")
    if damage == "truncated":
        shard = next(model.glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:1000])
    code, _, err = cli("train", recipe(work), "--set", f"model.name_or_path={model}")
    assert code == 2, err
    one_error(err, str(model))
    code, _, err = cli("generate", model, "--prompts", prompts(work), "--out", work / "a.json", *GENERATE)
    assert code == 2, err
    one_error(err, str(model))


def test_a_checkpoint_whose_weights_are_missing_is_exit_2(cli, work):
    assert cli("train", recipe(work), "--set", "train.max_steps=2",
               "--set", "train.keep_last=2")[0] == 0
    step1, step2 = (work / "run" / "checkpoints" / f"step-{n}" for n in (1, 2))
    (step1 / "adapter_model.safetensors").unlink()
    (step2 / "adapter_model.safetensors").unlink()
    (step2 / "adapter_config.json").unlink()
    for folder, culprit in ((step1, "cannot load the adapter"), (step2, "holds neither an adapter")):
        code, _, err = cli("generate", folder, "--prompts", prompts(work), "--out", work / "a.json", *GENERATE)
        assert code == 2, err
        one_error(err, str(folder), culprit)


@pytest.mark.parametrize(("file", "content"), [("metrics.jsonl", "[1, 2]\n"), ("metrics.jsonl", '{"loss": 1}\n'),
                                              ("metrics.jsonl", '{"step": 1, "loss": "high"}\n'),
                                              ("recipe.yaml", "neftune: [a\n"), ("recipe.yaml", "- a list\n")])
def test_compare_and_plot_of_a_damaged_run_are_exit_2(cli, work, file, content):
    assert cli("train", recipe(work), "--set", "train.max_steps=1")[0] == 0
    (work / "run" / file).write_text(content)
    for command in (("compare", work / "run"), ("plot", work / "run", "--out", work / "c.png")):
        code, _, err = cli(*command)
        if file == "recipe.yaml" and command[0] == "plot":
            assert code == 0, err  # plot reads only the metrics
            continue
        assert code == 2, (command, err)
        one_error(err, file)


@pytest.mark.parametrize(("sets", "culprit"), [
    (["train=5", "train.lr=1"], "--set train.lr: train is 5, not a section"),
    (["train.adam_betas=[0.9, 1.5]"], "adam_betas"),
    (["train.seed=18446744073709551616"], "train.seed"),
    (["lora.target_modules=[" + ", ".join(f"&{k} [{', '.join([f'*{k - 1}' if k else 'x'] * 10)}]"
                                          for k in range(9)) + "]"], "more than 100,000 values"),  # 10^9 strings
])
def test_bad_set_values_are_exit_2(cli, work, sets, culprit):
    code, _, err = cli("validate", recipe(work), *[a for s in sets for a in ("--set", s)])
    assert code == 2
    one_error(err, culprit)


def test_modules_to_save_naming_no_module_is_exit_2(cli, work):
    code, _, err = cli("train", recipe(work), "--set", "lora.modules_to_save=[lm_haed]")
    assert code == 2
    one_error(err, "lora.modules_to_save", "lm_haed")
    assert cli("train", recipe(work), "--set", "lora.modules_to_save=[lm_head]", "--set", "train.max_steps=1")[0] == 0


@pytest.mark.parametrize("damage", ["not a state", "another run"])
def test_resume_falls_back_from_a_damaged_or_foreign_optimizer_state(cli, work, damage):
    path = recipe(work, text=RECIPE.replace("keep_last: 1", "keep_last: 3"))
    assert cli("train", path, "--set", "train.max_steps=3")[0] == 0
    state_file = work / "run" / "checkpoints" / "step-3" / "trainer_state.pt"
    if damage == "not a state":
        torch.save({"optimizer": [1, 2]}, state_file)
    else:
        other = recipe(work, out=work / "other", name="o.yaml")
        assert cli("train", other, "--set", "train.max_steps=1", "--set", "lora.r=8")[0] == 0
        state_file.write_bytes((work / "other" / "checkpoints" / "step-1" / "trainer_state.pt").read_bytes())
    code, _, err = cli("train", path, "--set", "train.max_steps=3", "--resume")
    assert code == 0, err
    assert "step-3/trainer_state.pt" in err and "trying the checkpoint before it" in err and "step-2" in err


def test_data_clean_names_a_missing_file_a_missing_column_and_a_ragged_csv_row(cli, work):
    code, _, err = cli("data", "clean", work / "nope.jsonl", "--out", work / "o.jsonl")
    assert code == 2
    assert "hub" not in one_error(err, "nope.jsonl", "file not found")
    code, _, err = cli("data", "clean", work / "train.jsonl", "--dry-run", "--field", "instruction=question")
    assert code == 2
    one_error(err, "no column 'question'", "instruction=question")
    (work / "r.csv").write_text("instruction,output\nSay hello to the whole team,hi,extra\n")
    code, _, err = cli("data", "clean", work / "r.csv", "--out", work / "o.csv")
    assert code == 2 and not (work / "o.csv").exists()
    one_error(err, "r.csv", "line 2", "3 fields where the header has 2")


def test_report_equal_to_out_is_refused(cli, work):
    code, _, err = cli("data", "clean", work / "train.jsonl", "--out", work / "o.jsonl", "--report", work / "o.jsonl")
    assert code == 2 and not (work / "o.jsonl").exists()
    one_error(err, "--report", "o.jsonl")


def test_output_dir_expands_the_home_folder(cli, work, monkeypatch):
    monkeypatch.setenv("HOME", str(work))
    code, out, err = cli("validate", recipe(work, out="~/runs/x"), "--json")
    assert code == 0, err
    assert json.loads(out)["recipe"]["output"]["dir"] == str(work / "runs" / "x")


def test_max_new_tokens_past_the_models_positions_is_refused(cli, work, tiny_model_dir):
    code, _, err = cli("generate", tiny_model_dir, "--prompts", prompts(work), "--out", work / "a.json",
                       "--max-new-tokens", "1000000000")
    assert code == 2 and not (work / "a.json").exists()
    one_error(err, "--max-new-tokens", "positions")


def test_sigterm_during_the_data_cache_write_leaves_nothing_the_next_run_keeps(cli, work, neftune_cache):
    path = recipe(work)
    (work / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(24, seed=11)))  # a new cache entry
    proc = start_paused(path, "cache-write", work / "ready", command="data stats")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert list((neftune_cache / "data").glob(".tmp-*")), "the kill should leave the temporary entry"
    code, _, err = cli("data", "stats", path)
    assert code == 0, err
    assert not list((neftune_cache / "data").glob(".tmp-*"))


def test_nproc_with_a_grad_accum_it_does_not_divide_is_refused_before_torchrun(cli, work, monkeypatch):
    import neftune_cli.cli.app as app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(app, "run_torchrun", lambda n: pytest.fail("torchrun was started"))
    code, _, err = cli("train", recipe(work), "--nproc", "2", "--set", "train.grad_accum=3")
    assert code == 2
    one_error(err, "train.grad_accum 3", "2 processes")
    assert not (work / "run").exists()


# --- issue 21: shell logs -------------------------------------------------------------------------------------


# set by in-process runs of main() in this test session; a shell's environment has none of them
QUIET_SWITCHES = {"NEFTUNE_DEBUG", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"}


def neftune(*args: str, close_stdout: bool = False) -> tuple[int, str]:
    """The command in a child process, as a shell runs it (stderr a pipe, not a terminal): (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "neftune_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k not in
                                                                    QUIET_SWITCHES})
    if close_stdout:  # the reader went away, as `| head -1` does once it has its line
        proc.stdout.close()
        err = proc.stderr.read()
        return proc.wait(timeout=300), err
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_stdout_piped_to_a_reader_that_stops_ends_quietly(work):
    code, err = neftune("data", "preview", recipe(work), "-n", "20", close_stdout=True)
    assert code == 141, err  # what the shell reports for `cat big | head -1`'s cat
    assert "Traceback" not in err and "Broken" not in err and "error" not in err, err


def test_a_scripted_log_holds_no_progress_bars_and_no_library_notes(work, tiny_model_dir):
    import transformers

    command = ("generate", tiny_model_dir, "--prompts", prompts(work), "--out", work / "a.json", *GENERATE)
    code, err = neftune(*command)
    assert code == 0, err
    assert "\r" not in err and "Loading weights" not in err and "gemm_4bit" not in err, err
    assert err.startswith("generate:"), err  # our lines only
    code, err = neftune("train", recipe(work), "--set", "train.max_steps=1")
    assert code == 0, err
    assert "\r" not in err and "Warning" not in err and "gemm_4bit" not in err, err
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 4 has no "Loading weights" bar
        code, err = neftune("--debug", *command, "--overwrite")
        assert code == 0 and "Loading weights" in err, err


def test_resume_with_a_damaged_metrics_file_names_the_line(cli, work):
    path = recipe(work, text=RECIPE.replace("keep_last: 1", "keep_last: 3"))
    assert cli("train", path, "--set", "train.max_steps=2")[0] == 0
    metrics_file = work / "run" / "metrics.jsonl"
    metrics_file.write_text(metrics_file.read_text() + "not json\n")
    code, _, err = cli("train", path, "--set", "train.max_steps=3", "--resume", "--force")
    assert code == 2
    one_error(err, "metrics.jsonl", "line 3")
