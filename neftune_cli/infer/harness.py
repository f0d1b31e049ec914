"""`neftune eval --tasks`: EleutherAI's lm-evaluation-harness on the model as `eval` loads it.

The harness gets our loaded model object (``HFLM(pretrained=model, tokenizer=...)``): a run's base as its recipe
loads it (dtype, attention, a QLoRA run's 4-bit base) with the adapter applied unmerged, as it was trained. Task
prompts are the harness's own (no chat template), as on the OpenLLM Leaderboard the paper's Table 3 comes from.

The harness's results JSON is written with our marker in it (into a run dir: one file per task list), so a later
run can tell a file it may replace from one it must not touch; task_rows() reads it back for the table here and for
`neftune compare`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from pathlib import Path
from unittest import mock

from neftune_cli import __version__
from neftune_cli.infer.target import Target, inference_device
from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.console import log
from neftune_cli.io.errors import DataError, UsageError

RESULTS_GLOB = "lm_eval-*.json"  # in a run dir: one file per eval --tasks, where `neftune compare` looks
MARKER = "neftune_cli"  # our key in the results JSON
EXTRA = "pip install 'neftune-cli[lm-eval]'"
PRIMARY = ("acc_norm", "acc")  # the metric shown first: the OpenLLM Leaderboard's (ARC/HellaSwag acc_norm, MMLU acc)


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {EXTRA}") from None


def results_path(spec: str, tasks: list[str], given: Path | None) -> Path | None:
    """--results, else RUN/lm_eval-<tasks>.json in a run dir; None for other models (then nothing is written).
    One file per task list, so the Leaderboard's tasks, each at its own shot count, sit side by side."""
    if given is not None:
        return given
    run = Path(spec).expanduser()
    if not (run / "recipe.yaml").is_file():
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", "+".join(tasks))
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return run / RESULTS_GLOB.replace("*", name)


def check_writable(path: Path, overwrite: bool) -> None:
    """Before any work: a file there is replaced only if an earlier `eval --tasks` wrote it, and with --overwrite."""
    if path.is_dir():
        raise UsageError(f"--results {path}: is a folder; give a file name")
    if not path.exists():
        return
    if not _is_ours(path):
        raise UsageError(f"--results {path}: the file exists and was not written by neftune eval --tasks; "
                         "not replacing it (give another --results)")
    if not overwrite:
        raise UsageError(f"--results {path}: exists (an earlier neftune eval --tasks); --overwrite replaces it")


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def run_tasks(target: Target, spec: str, tasks: list[str], *, limit: int | None, num_fewshot: int | None,
              batch_size: int | None, include_path: Path | None) -> dict:
    """The harness's results dict (samples left out), with our marker."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {include_path}: not a folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"--tasks: unknown task '{name}'{hint} (`lm-eval ls tasks` lists them; local YAMLs: "
                             "--include-path DIR)")
    if batch_size is None:
        batch_size = target.recipe.train.micro_batch_size if target.recipe is not None else 8
    tokenizer = target.tokenizer()
    model = target.load(inference_device(), merge=False)
    log(f"eval: lm-evaluation-harness {version('lm_eval')} on "
        f"{target.name} ({'adapter unmerged, ' if target.adapter else ''}{next(model.parameters()).dtype}, "
        f"{model.device}): {', '.join(tasks)}, batch {batch_size}"
        + (f", {num_fewshot}-shot" if num_fewshot is not None else "") + (f", limit {limit}" if limit else ""))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _harness_quietly():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
    results.pop("samples", None)
    results[MARKER] = {"version": __version__, "model": spec, "tasks": tasks}
    return results


# The harness's modules that draw progress bars (requests built, tokenized, scored), each through its own `tqdm` name
_BARS = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})  # over the harness's own disable= (its rank check)


@contextmanager
def _harness_quietly() -> Iterator[None]:
    """The harness without its chatter in our users' logs: no git hash of the folder eval happens to run in (it says
    nothing about the model, and outside a repository git prints "fatal: not a git repository"), and off a terminal
    no progress bars. torch imports tqdm before our CLI starts, so its TQDM_DISABLE switch comes too late."""
    import lm_eval.evaluator

    quiet = [(lm_eval.evaluator, "get_git_commit_hash", lambda: None)]
    if not sys.stderr.isatty():
        quiet += [(sys.modules.get(name), "tqdm", _no_bar) for name in _BARS]
    with ExitStack() as stack:
        for module, name, replacement in quiet:
            if hasattr(module, name):  # a harness version that moved one keeps that chatter, and still works
                stack.enter_context(mock.patch.object(module, name, replacement))
        yield


def write_results(path: Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    with atomic_file(path) as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)


def run_results(run: Path) -> list[dict]:
    """The results files eval --tasks wrote into a run dir, oldest first (others with the name are not ours)."""
    found = [p for p in run.glob(RESULTS_GLOB) if p.is_file() and _is_ours(p)]
    return [read_results(p) for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable lm-eval results file ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise DataError(f"{path}: not an lm-eval results file (no results object)")
    return results


def task_rows(results: dict) -> list[dict]:
    """One row per task asked for (groups by their aggregate, not their subtasks): every metric with its stderr,
    and the primary one (acc_norm, else acc, else the first) as metric/value/stderr."""
    inside = {s for subs in (results.get("group_subtasks") or {}).values() for s in subs}
    out = []
    for name, entry in results["results"].items():
        if name in inside or not isinstance(entry, dict):
            continue
        # the task's metrics are those it says which way is better for; the rest (sample_len...) is bookkeeping
        metrics = (results.get("higher_is_better") or {}).get(name)
        scores = {}
        for key, value in entry.items():
            metric, _, kind = key.partition(",")
            if (metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool)
                    or (metrics and metric not in metrics)):
                continue
            stderr = entry.get(f"{metric}_stderr,{kind}")
            label = metric if kind in ("", "none") else f"{metric},{kind}"
            scores[label] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        primary = next((m for m in PRIMARY if m in scores), next(iter(scores), None))
        samples = (results.get("n-samples") or {}).get(name) or {}
        out.append({"task": name, "metric": primary, **(scores.get(primary) or {"value": None, "stderr": None}),
                    "n_shot": (results.get("n-shot") or {}).get(name),
                    "samples": samples.get("effective", entry.get("sample_len")),  # a group: its subtasks'
                    "metrics": scores})
    return out


def format_rows(task_rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells: task, n-shot, samples, then each metric as value ± stderr."""
    cells = []
    for r in task_rows:
        shown = "  ".join(f"{m} {score_cell(s)}" for m, s in r["metrics"].items())
        cells.append([r["task"], _text(r["n_shot"]), _text(r["samples"]), shown])
    return ["task", "n-shot", "samples", "metrics (value ± stderr)"], cells


def score_cell(score: dict) -> str:
    value, stderr = score.get("value"), score.get("stderr")
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _text(value) -> str:
    return "n/a" if value is None else str(value)
