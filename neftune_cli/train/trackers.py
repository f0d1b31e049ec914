"""Where a run's metrics go besides metrics.jsonl (`train.report_to`): TensorBoard, Weights & Biases, MLflow and
Trackio behind one small interface, `log(scalars, step)` and `close(finished)`.

Each gets the scalars of metrics.jsonl under the same names (train/loss, train/lr, ..., eval/loss). W&B, MLflow and
Trackio also get the resolved recipe as the run's config (params) and the noise settings as tags; the tracker run
is named for the run directory. The id of the tracker run is kept in OUTPUT_DIR/trackers.json, so `--resume`
continues the same tracker run. TensorBoard drops what an interrupted run logged after its checkpoint (its
`purge_step`); the others cannot rewrite history, so the steps they already hold are not sent again (an exact
resume recomputes the same values).
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from rich.text import Text

from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.console import log
from neftune_cli.io.errors import RuntimeFailure, UsageError, first_line
from neftune_cli.recipe.load import leaves, lookup
from neftune_cli.recipe.schema import Recipe

TENSORBOARD_DIR = "tensorboard"
TRACKERS_FILE = "trackers.json"  # the tracker runs' ids, for --resume
DEFAULT_PROJECT = "neftune"
# tracker -> (the module it needs, the extra that installs it)
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


def require_trackers(recipe: Recipe) -> None:
    """Before any work: every tracker's package is importable (exit 2 naming the extra), and an MLflow server,
    when MLflow is told to use one, answers (exit 1, one line)."""
    for name in recipe.train.report_to:
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:  # torch imports the tensorboard package lazily, here
            raise UsageError(f"train.report_to: {name} needs the {extra} package: "
                             f"pip install 'neftune-cli[{extra}]'") from None
    if "mlflow" in recipe.train.report_to:
        _check_mlflow_store()


def _check_mlflow_store() -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:  # MLflow's client retries for minutes before it gives up; ask once, briefly
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeFailure(f"train.report_to: mlflow: cannot reach the tracking server {uri} "
                                 f"({getattr(e, 'reason', e)}); check MLFLOW_TRACKING_URI") from None
        return
    try:  # a local store: a database backend mlflow-skinny lacks, a file store mlflow 3 refuses by default
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MlflowException, ImportError of a backend package
        raise RuntimeFailure(f"train.report_to: mlflow: cannot use the tracking store {uri} ({first_line(e)}); "
                             "set MLFLOW_TRACKING_URI") from None


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers as tracker scalars: eval/loss, train/<key>."""
    return {("eval/loss" if key == "eval_loss" else f"train/{key}"): float(value) for key, value in record.items()
            if key not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value)}


def open_trackers(run_root: Path, recipe: Recipe, start_step: int) -> list:
    """The recipe's trackers for this run; a resumed run's continue the tracker runs trackers.json names."""
    ids_file = run_root / TRACKERS_FILE
    ids = json.loads(ids_file.read_text(encoding="utf-8")) if start_step and ids_file.is_file() else {}
    trackers = []
    try:
        for name in recipe.train.report_to:
            state = ids.setdefault(name, {})
            trackers.append(TRACKER_CLASSES[name](run_root, recipe, start_step, state, lambda: _save(ids_file, ids)))
    except BaseException:
        for tracker in trackers:
            tracker.close(finished=False)
        raise
    return trackers


def _save(path: Path, ids: dict) -> None:
    with atomic_file(path) as f:
        json.dump({k: v for k, v in ids.items() if v}, f, indent=2)


def _tags(recipe: Recipe) -> dict[str, str]:
    return {"neftune.alpha": f"{recipe.neftune.alpha or 0:g}", "neftune.scale": recipe.neftune.scale}


def _flat(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as dotted keys (data.sources.0.path, ...), for trackers whose params are flat."""
    tree = recipe.model_dump(mode="json")
    values = {key: lookup(tree, key) for key in leaves(tree)}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def _start_failed(name: str, e: BaseException, hint: str) -> RuntimeFailure:
    return RuntimeFailure(f"train.report_to: {name}: cannot start the run ({first_line(e)}){hint}")


class TensorBoard:
    rewinds = True  # purge_step drops what an interrupted run logged after the checkpoint

    def __init__(self, run_root: Path, recipe: Recipe, start_step: int, state: dict, save) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_root / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class Wandb:
    rewinds = False

    def __init__(self, run_root: Path, recipe: Recipe, start_step: int, state: dict, save) -> None:
        import wandb

        new = "id" not in state
        state.setdefault("id", secrets.token_hex(6))  # W&B run ids are [a-z0-9]
        save()  # before init: a crash during it still resumes this id
        tracking = recipe.train.tracking
        try:
            self.run = wandb.init(
                project=tracking.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=tracking.entity, name=run_root.name, id=state["id"], resume="allow",
                config=recipe.model_dump(mode="json") if new else None,
                tags=[f"{k}={v}" for k, v in _tags(recipe).items()], settings=wandb.Settings(silent=True))
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds (CommError, UsageError, timeouts)
            raise _start_failed("wandb", e, "; WANDB_MODE=offline logs locally (wandb sync uploads later)") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Mlflow:
    rewinds = False

    def __init__(self, run_root: Path, recipe: Recipe, start_step: int, state: dict, save) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(state.get("tracking_uri") or mlflow.get_tracking_uri())
            if "run_id" in state:
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            name = recipe.train.tracking.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_root.name, tags=_tags(recipe))
            self.run_id = run.info.run_id
            state.update(run_id=self.run_id, tracking_uri=self.client.tracking_uri)
            save()
            params = [Param(k, v[:6000]) for k, v in _flat(recipe).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        except Exception as e:  # noqa: BLE001 - MlflowException, connection errors, a missing backend package
            raise _start_failed("mlflow", e, "; check MLFLOW_TRACKING_URI") from None

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class Trackio:
    rewinds = False

    def __init__(self, run_root: Path, recipe: Recipe, start_step: int, state: dict, save) -> None:
        import trackio

        state.setdefault("name", run_root.name)
        save()
        try:
            with _prints_as_log_lines():
                self.run = trackio.init(project=recipe.train.tracking.project or DEFAULT_PROJECT, name=state["name"],
                                        config={**_flat(recipe), **_tags(recipe)}, resume="allow")
        except Exception as e:  # noqa: BLE001 - local storage or a Space/server it was pointed at
            raise _start_failed("trackio", e, "") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, finished: bool) -> None:
        import trackio

        with _prints_as_log_lines():
            trackio.finish()  # not run.finish(): this also ends it as the current run, so exit does not finish it again


@contextmanager
def _prints_as_log_lines() -> Iterator[None]:
    """Trackio prints its notes (where the run is kept, how to open the dashboard), coloured, on stdout, which holds
    our results: they are log lines, so they go to stderr as plain lines."""
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            log(Text.from_ansi(line).plain)


TRACKER_CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow, "trackio": Trackio}


def log_to(trackers: list, record: dict, already_logged: set) -> list:
    """Send one metrics record to every tracker; one that fails midway is dropped with a warning, since
    metrics.jsonl holds everything anyway. Returns the trackers still working."""
    values, step = scalars(record), record["step"]
    kind = "eval" if "eval_loss" in record else "train"
    working = []
    for tracker in trackers:
        if not tracker.rewinds and (step, kind) in already_logged:
            working.append(tracker)
            continue
        try:
            tracker.log(values, step)
            working.append(tracker)
        except Exception as e:  # noqa: BLE001 - a tracker's network or storage failure must not stop training
            log(f"warning: {type(tracker).__name__.lower()} stopped receiving metrics at step {step}: "
                f"{first_line(e)} (metrics.jsonl has them all)")
    return working
