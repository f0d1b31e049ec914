"""train.report_to: wandb / mlflow / trackio, against the real packages, offline: the scalars each holds equal
metrics.jsonl, the config and tags are the recipe's, and a resume continues the same tracker run with every step
once (tiny model, a few steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from run_helpers import tiny_run_yaml

from neftune_cli.demo import tasks as demo_tasks
from neftune_cli.train.trackers import scalars


@pytest.fixture
def work(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(24, seed=3)))
    (tmp_path / "eval.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(4, seed=4, split="eval")))
    path = tmp_path / "r.yaml"
    path.write_text(tiny_run_yaml(tmp_path / "run", eval_data=True, lora={"r": 4, "alpha": 8},
                                  train={"max_steps": 6, "save_every": 2, "keep_last": 10,
                                         "tracking": {"project": "sweeps"}}))
    return path


def expected(run: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in metrics.jsonl, as a tracker should hold them."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(tag, r["step"]): value for r in records for tag, value in scalars(r).items()}


def same_values(got: dict[tuple[str, int], list[float]], want: dict[tuple[str, int], float]) -> None:
    """Every (tag, step) once, with metrics.jsonl's value. Steps 3-6 were logged before the crash and not sent again:
    their timings are the first attempt's, everything else is the same number (an exact resume)."""
    assert set(got) == set(want)
    for (tag, step), values in got.items():
        assert len(values) == 1, (tag, step)  # no step sent twice
        if not (step > 2 and tag in ("train/tokens_per_s", "train/elapsed_s")):
            assert values[0] == pytest.approx(want[tag, step], rel=1e-9), (tag, step)


def crash_after_checkpoint_2(run: Path) -> None:
    """What a kill -9 after step 6 was logged but before its checkpoint leaves: steps 3-6 logged, step-2 the
    newest checkpoint."""
    for lost in ("final", "checkpoints/step-4", "checkpoints/step-6"):
        shutil.rmtree(run / lost)


# --- W&B, offline ------------------------------------------------------------------------------------------


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file (a LevelDB-style log: 32 KiB blocks of crc32c, length, type, data)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, parts = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(parts)
            parts = b""
    return records


def wandb_run(wandb_dir: Path) -> dict:
    """Everything the offline run files say: run ids, names, tags, config keys, and each (tag, step) logged, with
    its values in order (a step logged twice shows twice)."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = {"ids": set(), "names": set(), "tags": set(), "projects": set(), "config": {}, "history": {}}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for raw in wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["ids"].add(record.run.run_id)
                found["names"].add(record.run.display_name)
                found["projects"].add(record.run.project)
                found["tags"] |= set(record.run.tags)
                found["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                step = record.history.step.num
                for tag, value in items.items():
                    if not tag.startswith("_"):
                        found["history"].setdefault((tag, step), []).append(value)
    return found


def test_wandb_offline_holds_the_metrics_and_resumes_the_same_run(cli, work, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(work.parent))
    report = ("--set", "train.report_to=[wandb]")
    code, _, err = cli("train", work, *report)
    assert code == 0, err
    run = work.parent / "run"
    crash_after_checkpoint_2(run)
    code, _, err = cli("train", work, "--resume", *report)
    assert code == 0, err

    found = wandb_run(work.parent)
    stored = json.loads((run / "trackers.json").read_text())
    assert found["ids"] == {stored["wandb"]["id"]}  # both segments are the one W&B run
    assert found["names"] == {"run"} and found["projects"] == {"sweeps"}
    assert {"neftune.alpha=5", "neftune.scale=paper"} <= found["tags"]
    assert found["config"]["neftune"] == {"alpha": 5.0, "scale": "paper"}
    same_values(found["history"], expected(run))


# --- MLflow: a local file store, and a real server -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["file-store", "server"])
def mlflow_uri(request, tmp_path, monkeypatch):
    """Where MLflow keeps the runs, set as MLFLOW_TRACKING_URI: a local file store, or a real `mlflow server` with a
    sqlite backend on 127.0.0.1, as a team runs one (it needs the full mlflow package, not only mlflow-skinny)."""
    pytest.importorskip("mlflow")
    if request.param == "file-store":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 prefers a database; the file store suffices
        uri = (tmp_path / "mlruns").as_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
        return
    pytest.importorskip("sqlalchemy", reason="mlflow server needs the full mlflow package")
    port, log = free_port(), tmp_path / "mlflow-server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--default-artifact-root", (tmp_path / "artifacts").as_uri()],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=60)


def test_mlflow_holds_the_metrics_and_resumes_the_same_run(cli, work, mlflow_uri):
    from mlflow.tracking import MlflowClient

    report = ("--set", "train.report_to=[mlflow]")
    assert cli("train", work, *report)[0] == 0
    run = work.parent / "run"
    stored = json.loads((run / "trackers.json").read_text())["mlflow"]
    run_id = stored["run_id"]
    assert stored["tracking_uri"] == mlflow_uri  # what --resume goes back to
    crash_after_checkpoint_2(run)
    code, _, err = cli("train", work, "--resume", *report)
    assert code == 0, err

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resume continued it, no second run
    info = runs[0]
    assert info.info.run_name == "run" and info.info.status == "FINISHED"
    assert info.data.tags["neftune.alpha"] == "5" and info.data.tags["neftune.scale"] == "paper"
    assert info.data.params["train.lr"] == "0.003" and info.data.params["data.max_seq_len"] == "128"
    want = expected(run)
    got = {}
    for tag in {tag for tag, _ in want}:
        for metric in client.get_metric_history(run_id, tag):
            got.setdefault((tag, metric.step), []).append(metric.value)
    same_values(got, want)


def test_mlflow_server_that_does_not_answer_fails_at_start_up(cli, work, monkeypatch):
    pytest.importorskip("mlflow")
    port = free_port()  # nobody listens on it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    code, _, err = cli("train", work, "--set", "train.report_to=[mlflow]")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train.report_to: mlflow: cannot reach the tracking "
                                                   f"server http://127.0.0.1:{port}"), err
    assert not (work.parent / "run").exists()  # before any work


def test_an_mlflow_store_that_cannot_be_opened_fails_at_start_up(cli, work, monkeypatch):
    """A database store this machine cannot open: mlflow-skinny has no SQLAlchemy, full mlflow no PostgreSQL
    driver, and with one there is no database on that port."""
    pytest.importorskip("mlflow")
    uri = f"postgresql://127.0.0.1:{free_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, _, err = cli("train", work, "--set", "train.report_to=[mlflow]")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train.report_to: mlflow: cannot use the tracking store "
                                                   f"{uri} ("), err
    assert not (work.parent / "run").exists()


# --- Trackio, local ------------------------------------------------------------------------------------------


def test_trackio_local_holds_the_metrics_and_resumes_the_same_run(cli, work, monkeypatch):
    pytest.importorskip("trackio")
    report = ("--set", "train.report_to=[trackio]")
    code, out, err = cli("train", work, *report)
    assert code == 0, err
    # Trackio's own notes are log lines: on stderr, plain, and stdout holds only ours
    assert "Trackio" not in out and "* Created new run: run" in err.splitlines() and "\x1b" not in err, (out, err)
    run = work.parent / "run"
    crash_after_checkpoint_2(run)
    code, _, err = cli("train", work, "--resume", *report)
    assert code == 0, err

    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("sweeps") == ["run"]
    want = expected(run)
    got = {}
    for row in SQLiteStorage.get_logs("sweeps", "run"):
        for tag, value in row.items():
            if (tag, row["step"]) in want:
                got.setdefault((tag, row["step"]), []).append(value)
    same_values(got, want)


@pytest.mark.parametrize("tracker,extra", [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_a_missing_tracker_package_names_the_extra(cli, work, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # its import now raises ImportError
    code, _, err = cli("train", work, "--set", f"train.report_to=[{tracker}]")
    assert code == 2
    assert err.strip() == (f"error: train.report_to: {tracker} needs the {extra} package: "
                           f"pip install 'neftune-cli[{extra}]'")
    assert not (work.parent / "run").exists()

