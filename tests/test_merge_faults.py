"""Faults around ``neftune merge``: signals and kill -9 mid-write, an unfinished run, a different --base, corrupt
safetensors, a bad --out and a full disk. Each checks the exit code, the one error line, and what is left on disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_merge import make_adapter, make_base

from neftune_cli.io import safetensors_io as st
from neftune_cli.merge.base import same_base

pytestmark = pytest.mark.filterwarnings("ignore")

OWNER_FILE = ".neftune-merge-owner"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    base = make_base(root / "base")
    return base, make_adapter(base, root / "adapter")


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(stderr: str) -> str:
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    return errors[0]


def temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


# ---------------------------------------------------------------------------------------------------- signals, kill -9


def start_merge(adapter: Path, out: Path, ready: Path, *extra: str) -> subprocess.Popen:
    """`neftune merge` in a child process that stops inside the write (after its first shard) until signalled."""
    env = dict(os.environ, NEFTUNE_TEST_PAUSE_AT="merge-write", NEFTUNE_TEST_PAUSE_FILE=str(ready))

    def default_signals() -> None:  # a shell without job control starts background jobs with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "neftune_cli", "merge", str(adapter), "--out", str(out), "--no-verify",
         "--max-shard-size", "20KB", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )


def wait_until_paused(proc: subprocess.Popen, ready: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"merge ended (exit {proc.returncode}) before reaching the pause point:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("merge never reached the pause point")
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_write_removes_the_temp_folder(signum, code, llama, tmp_path, cli):
    _, adapter = llama
    out = tmp_path / "out"
    assert cli("merge", adapter, "--out", out, "--no-verify")[0] == 0  # --overwrite: this must survive
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ready = tmp_path / "ready"
    proc = start_merge(adapter, out, ready, "--overwrite")
    wait_until_paused(proc, ready)
    [tmp] = temp_folders(tmp_path)  # mid-write: our temp folder, with a shard in it
    assert any((tmp_path / tmp).glob("model-*.safetensors"))

    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert one_error(stderr) == f"error: merge interrupted; nothing written to {out}"
    assert temp_folders(tmp_path) == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_kill_9_leftover_is_removed_by_the_next_merge_but_not_a_live_one(llama, tmp_path, cli):
    _, adapter = llama
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    proc = start_merge(adapter, out, ready)
    wait_until_paused(proc, ready)
    proc.kill()
    proc.communicate(timeout=60)
    [killed] = temp_folders(tmp_path)  # the fault: kill -9 leaves the half-written folder behind
    assert killed.startswith(".tmp-out-") and any((tmp_path / killed).glob("model-*.safetensors"))
    assert json.loads((tmp_path / killed / OWNER_FILE).read_text())["pid"] == proc.pid

    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def leftover(name: str, owner: dict | None, age_s: float = 0) -> Path:
            p = tmp_path / name
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"x" * 100)
            if owner is not None:
                (p / OWNER_FILE).write_text(json.dumps(owner))
            if age_s:
                t = time.time() - age_s
                os.utime(p, (t, t))
            return p

        alive = leftover(".tmp-out-live_abc", {"pid": live.pid, "host": host})  # another merge at work
        other = leftover(".tmp-other-deadbeef", {"pid": proc.pid, "host": host})  # another target's
        fresh = leftover(".tmp-out-noowner1", None)  # no owner file, young: could be a merge just starting
        stale = leftover(".tmp-out-noowner2", None, age_s=2 * 3600)  # no owner file, old: a crash's
        foreign = leftover(".tmp-out-not-ours-at-all", {"pid": proc.pid, "host": host})  # not atomic_dir's name

        code, _, err = cli("merge", adapter, "--out", out, "--no-verify")
        assert code == 0, err
        assert error_lines(err) == []
        assert f"removed 2 temporary folder(s) that an interrupted merge left beside {out}" in err
        assert not (tmp_path / killed).exists() and not stale.exists()
        assert alive.is_dir() and other.is_dir() and fresh.is_dir() and foreign.is_dir()
        assert (out / "model.safetensors").is_file() and not (out / OWNER_FILE).exists()
    finally:
        live.kill()
        live.wait()


def test_pause_hook_is_inert_unless_named(monkeypatch, tmp_path):
    from neftune_cli.io import faults

    ready = tmp_path / "ready"
    monkeypatch.setenv("NEFTUNE_TEST_PAUSE_AT", "train-step")
    monkeypatch.setenv("NEFTUNE_TEST_PAUSE_FILE", str(ready))
    t0 = time.monotonic()
    faults.checkpoint("merge-write")
    assert time.monotonic() - t0 < 1 and not ready.exists()


# ---------------------------------------------------------------------------------------------------- unfinished run


def test_run_without_final_names_the_latest_checkpoint(llama, tmp_path, cli):
    base, adapter = llama
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "neftune-run.json").write_text("{}")
    for step, complete in ((2, True), (4, True), (6, False)):  # step-6: being written, no meta.json yet
        ckpt = run / "checkpoints" / f"step-{step}"
        shutil.copytree(adapter, ckpt)
        if complete:
            (ckpt / "meta.json").write_text(json.dumps({"step": step}))

    code, _, err = cli("merge", run, "--out", tmp_path / "out")
    assert code == 2
    line = one_error(err)
    assert len(err.strip().splitlines()) == 1
    assert "no final/" in line and str(run / "checkpoints" / "step-4") in line and "adapter_config" not in line
    assert not (tmp_path / "out").exists()

    code, _, err = cli("merge", run / "checkpoints" / "step-4", "--out", tmp_path / "out", "--no-verify")
    assert code == 0, err

    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (empty_run / "neftune-run.json").write_text("{}")
    code, _, err = cli("merge", empty_run, "--out", tmp_path / "out2")
    assert code == 2 and "no final/ and no complete checkpoint" in one_error(err)


# ---------------------------------------------------------------------------------------------------- --base


def test_base_other_than_the_recorded_one_warns(llama, tmp_path, cli):
    base, adapter = llama
    other = make_base(tmp_path / "other-base", seed=5)  # same shapes, other weights: merges, but is it meant?
    code, _, err = cli("merge", adapter, "--out", tmp_path / "out", "--base", other, "--no-verify")
    assert code == 0, err
    assert error_lines(err) == []
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(other) in warnings[0] and str(base) in warnings[0]

    # the recorded base spelled differently (a symlink, a trailing slash) is the same base: no warning
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    code, _, err = cli("merge", adapter, "--out", tmp_path / "out2", "--base", f"{link}/", "--no-verify")
    assert code == 0, err
    assert "warning:" not in err


def test_same_base_rules(tmp_path):
    snap = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    copy = tmp_path / "models" / "Llama-2-7b-hf"
    other = tmp_path / "models" / "Mistral-7B"
    for d in (snap, copy, other):
        d.mkdir(parents=True)
    assert same_base(str(snap), "meta-llama/Llama-2-7b-hf")  # the hub cache's copy
    assert same_base(str(copy), "meta-llama/Llama-2-7b-hf")  # a local copy of the same repo
    assert same_base("meta-llama/llama-2-7b-hf", "meta-llama/Llama-2-7b-hf")
    assert same_base(str(copy), "/home/someone/models/Llama-2-7b-hf")  # trained on another machine
    assert not same_base(str(other), "meta-llama/Llama-2-7b-hf")
    assert not same_base(str(other), str(copy))
    assert not same_base("mistralai/Mistral-7B-v0.1", "meta-llama/Llama-2-7b-hf")


# ---------------------------------------------------------------------------------------------------- corrupt files


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "cut-in-header":
        path.write_bytes(data[:20])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage-header":
        path.write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]" + data[8:])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "cut-in-header", "empty", "garbage-header"])
def test_corrupt_adapter_weights(how, llama, tmp_path, cli):
    _, adapter = llama
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    damage(bad / "adapter_model.safetensors", how)
    code, _, err = cli("merge", bad, "--out", tmp_path / "out")
    assert code == 2
    assert one_error(err) == (
        f"error: {bad / 'adapter_model.safetensors'}: not a valid safetensors file (truncated or corrupt)"
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and temp_folders(tmp_path) == []


@pytest.mark.parametrize("how", ["truncated", "cut-in-header", "garbage-header"])
def test_corrupt_base_shard(how, llama, tmp_path, cli):
    _, adapter = llama
    base = make_base(tmp_path / "base", shard="30KB")
    shard = sorted(base.glob("model-*.safetensors"))[1]
    damage(shard, how)
    code, _, err = cli("merge", adapter, "--out", tmp_path / "out", "--base", base)
    assert code == 2
    assert one_error(err) == f"error: {shard}: not a valid safetensors file (truncated or corrupt)"
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and temp_folders(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- --out, disk full


def test_out_is_an_existing_file(llama, tmp_path, cli):
    _, adapter = llama
    out = tmp_path / "out"
    out.write_text("not a folder")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli("merge", adapter, "--out", out, *extra)
        assert code == 2
        assert one_error(err) == f"error: output path {out} exists and is not a directory"
        assert out.read_text() == "not a folder"
    code, _, err = cli("merge", adapter, "--out", out / "merged")  # a file where the parent folder should be
    assert code == 2 and one_error(err) == f"error: output folder {out} is not a directory"
    assert out.read_text() == "not a folder" and temp_folders(tmp_path) == []


def test_out_parent_not_writable(llama, tmp_path, cli, monkeypatch):
    _, adapter = llama
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make os.access answer as it would for anyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real(p, mode, **kw))
    try:
        code, _, err = cli("merge", adapter, "--out", parent / "out")
        assert code == 2
        assert one_error(err) == f"error: output folder {parent} is not writable"
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("where", ["shard", "side-file"])
def test_disk_full_while_writing(where, llama, tmp_path, cli, monkeypatch):
    _, adapter = llama
    out = tmp_path / "out"
    if where == "shard":
        real_copy = st.Reader.copy_to
        calls = []

        def copy_to(self, entry, dst):
            calls.append(entry)
            if len(calls) == 3:  # part of a tensor reaches the disk, then the disk is full
                dst.write(b"\0" * (entry.nbytes // 2))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_copy(self, entry, dst)

        monkeypatch.setattr(st.Reader, "copy_to", copy_to)
        culprit = out / "model.safetensors"
    else:
        def copyfile(src, dst, **kw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(shutil, "copyfile", copyfile)
        culprit = out
    code, _, err = cli("merge", adapter, "--out", out)
    assert code == 1
    assert one_error(err) == f"error: disk full while writing {culprit} (the write failed: No space left on device)"
    assert not out.exists() and temp_folders(tmp_path) == []
