"""`neftune sweep`: one training run per combination of a grid (the paper's alpha ablation in one command), each
answered and compared at the end.

Every run is `neftune train` in a subprocess, on its own run directory under the recipe's `output.dir`, so a sweep
resumes exactly as `train --resume` does and a sweep's run is the same run as the `--print`ed command gives on a
scheduler. `sweep.json` beside the runs records the grid and each run's state (written atomically under a lock,
since `--print`ed commands may run at the same time). A second `neftune sweep` skips what finished, resumes what
was interrupted and starts the rest.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.console import log, out
from neftune_cli.io.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, RecipeError, RuntimeFailure, UsageError
from neftune_cli.recipe.load import load_recipe
from neftune_cli.train.checkpoint import RUN_MARKER, RunDir

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
ANSWERS_DIR = "answers"
PLOT_FILE = "loss.png"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")  # what a run dir's name keeps of a value; the rest becomes _


@dataclass
class Combination:
    name: str  # the run dir's name: neftune.alpha=5,train.lr=1e-4
    sets: list[str]  # its --set items, as typed


@dataclass
class Sweep:
    recipe: Path
    sets: list[str]
    grid: list[tuple[str, list[str]]]
    root: Path  # the recipe's output.dir: the runs are its subfolders
    generate: Path | None = None
    generate_args: list[str] = field(default_factory=list)  # generate's options, as typed
    nproc: int | None = None
    combinations: list[Combination] = field(default_factory=list)

    def run_dir(self, c: Combination) -> Path:
        return self.root / c.name

    def answers(self, c: Combination) -> Path:
        suffix = ".jsonl" if _option(self.generate_args, "--format") == "jsonl" else ".json"
        return self.root / ANSWERS_DIR / f"{c.name}{suffix}"

    def command(self, only: str | None = None) -> list[str]:
        """This sweep as a command line (to continue it, or one run of it with `--only`)."""
        argv = ["neftune", "sweep", str(self.recipe)]
        argv += [a for s in self.sets for a in ("--set", s)]
        argv += [a for key, values in self.grid for a in ("--grid", f"{key}={','.join(values)}")]
        if self.generate is not None:
            argv += ["--generate", str(self.generate), *self.generate_args]
        if self.nproc is not None:
            argv += ["--nproc", str(self.nproc)]
        return argv + (["--only", only] if only else [])

    def identity(self) -> dict:
        """What makes two invocations the same sweep (and so allowed to share sweep.json)."""
        return {"recipe": str(self.recipe.resolve()), "set": self.sets, "grid": dict(self.grid)}


def split_values(text: str) -> list[str]:
    """`0,5,[q_proj,v_proj],'a,b'` -> ['0', '5', '[q_proj,v_proj]', "'a,b'"]: commas inside brackets or quotes
    belong to the value (each value is YAML, as for --set)."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    return values + [current.strip()]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid, seen = [], set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = split_values(text) if sep else []
        if not key or not sep or not all(values):
            raise UsageError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid neftune.alpha=0,5,10,15")
        if key in seen:
            raise UsageError(f"--grid {key}: given twice; put all its values in one --grid")
        if key == "output.dir" or key.startswith("output."):
            raise UsageError(f"--grid {key}: each run's output.dir is the sweep's choice (OUTPUT_DIR/<values>)")
        if len(set(values)) != len(values):
            raise UsageError(f"--grid {key}: a value is listed twice")
        seen.add(key)
        grid.append((key, values))
    if not grid:
        raise UsageError("sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def combinations(grid: list[tuple[str, list[str]]]) -> list[Combination]:
    result, names = [], {}
    for values in itertools.product(*(vs for _, vs in grid)):
        sets = [f"{key}={value}" for (key, _), value in zip(grid, values, strict=True)]
        name = _UNSAFE.sub("_", ",".join(sets))
        if name in names:
            raise UsageError(f"--grid: {sets} and {names[name]} would share the run dir {name}")
        names[name] = sets
        result.append(Combination(name, sets))
    return result


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def plan(recipe: Path, sets: list[str], grid_items: list[str], generate: Path | None, generate_args: list[str],
         nproc: int | None) -> Sweep:
    """Parse the grid and validate every combination (exit 2 naming the bad one) before any run starts."""
    grid = parse_grid(grid_items)
    base = load_recipe(recipe, sets)
    sweep = Sweep(recipe, sets, grid, Path(base.recipe.output.dir), generate, generate_args, nproc,
                  combinations(grid))
    for c in sweep.combinations:
        try:
            load_recipe(recipe, sweep_sets(sweep, c))
        except RecipeError as e:
            raise RecipeError([f"--grid {c.name}: {p}" for p in e.problems]) from None
    if generate is not None and not generate.is_file():
        raise UsageError(f"--generate {generate}: no such file")
    return sweep


def sweep_sets(sweep: Sweep, c: Combination) -> list[str]:
    """A run's --set items: the sweep's own, its values, and its run dir (a JSON string: YAML reads it as is)."""
    return [*sweep.sets, *c.sets, f"output.dir={json.dumps(str(sweep.run_dir(c)))}"]


def train_command(sweep: Sweep, c: Combination) -> list[str]:
    """`neftune train` for this run as things stand: resume from a checkpoint, restart one that saved none."""
    run = RunDir(sweep.run_dir(c))
    argv = ["train", str(sweep.recipe), *[a for s in sweep_sets(sweep, c) for a in ("--set", s)]]
    if run.checkpoint_steps():
        argv.append("--resume")
    elif run.root.is_dir() and any(run.root.iterdir()):
        argv.append("--overwrite")  # a run stopped before its first checkpoint: nothing to resume
    if sweep.nproc is not None:
        argv += ["--nproc", str(sweep.nproc)]
    return argv


def generate_command(sweep: Sweep, c: Combination) -> list[str]:
    # answers/ is the sweep's own (sweep_state admits no foreign entry in its folder): a retrained run's answers
    # replace the ones of its previous training
    return ["generate", str(sweep.run_dir(c)), "--prompts", str(sweep.generate), "--out", str(sweep.answers(c)),
            "--overwrite", *sweep.generate_args]


# --- sweep.json ------------------------------------------------------------------------------------------------


@contextmanager
def sweep_state(sweep: Sweep):
    """sweep.json, read and written under an flock (the --print commands of one sweep may run at once)."""
    root = sweep.root
    if (root / RUN_MARKER).exists():
        raise UsageError(f"output.dir {root} is a training run; a sweep puts its runs inside output.dir, so give "
                         "it a folder of its own (--set output.dir=...)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"output.dir {root}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = root / SWEEP_FILE
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            if {k: state.get(k) for k in sweep.identity()} != sweep.identity():
                raise UsageError(f"{path} records another sweep (grid {state.get('grid')}, recipe "
                                 f"{state.get('recipe')}); give this one its own output.dir")
        else:
            ours = {LOCK_FILE, ANSWERS_DIR, PLOT_FILE, *(c.name for c in sweep.combinations)}
            foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
            if foreign:
                raise UsageError(f"output.dir {root} holds {foreign[0]!r}, which is not part of this sweep; choose "
                                 "an empty or new output.dir (nothing in it was changed)")
            state = {**sweep.identity(), "runs": {}}
        for c in sweep.combinations:
            state["runs"].setdefault(c.name, {"set": c.sets, "dir": str(sweep.run_dir(c)), "state": "pending"})
        yield state
        with atomic_file(path) as f:
            json.dump(state, f, indent=2)
    finally:
        os.close(fd)


def set_state(sweep: Sweep, c: Combination, **values) -> None:
    with sweep_state(sweep) as state:
        state["runs"][c.name].update(values)


# --- running -----------------------------------------------------------------------------------------------------


class Child:
    """The command running now. SIGTERM and SIGINT reach us (the child has its own session, so a Ctrl-C is not
    delivered twice) and are passed on once: train saves a checkpoint and exits 143/130."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signum: int | None = None

    def handler(self, signum, frame) -> None:
        if self.signum is None:
            log(f"sweep: {signal.Signals(signum).name}: stopping after the current run's checkpoint")
        self.signum = self.signum or signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, argv: list[str]) -> int:
        command = [sys.executable, "-m", "neftune_cli", *argv]
        log(f"sweep: running: neftune {shlex.join(argv)}")
        self.proc = subprocess.Popen(command, start_new_session=True)
        try:
            return self.proc.wait()
        except BaseException:
            self.proc.kill()
            raise
        finally:
            self.proc.wait()


def run_sweep(sweep: Sweep, only: str | None = None) -> None:
    """Train (and answer) every combination not done yet; stop after a signal with the command to continue."""
    todo = sweep.combinations
    if only is not None:
        todo = [c for c in todo if c.name == only]
        if not todo:
            raise UsageError(f"--only {only}: not a run of this sweep (its runs: "
                             f"{', '.join(c.name for c in sweep.combinations)})")
    with sweep_state(sweep) as state:
        runs = state["runs"]
    child = Child()
    previous = {s: signal.signal(s, child.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = []
    try:
        for k, c in enumerate(todo, 1):
            need_train = not finished(sweep, c)
            need_answers = sweep.generate is not None and (
                need_train or runs[c.name]["state"] != "done" or not sweep.answers(c).is_file())
            if not (need_train or need_answers):
                log(f"sweep: [{k}/{len(todo)}] {c.name}: done, skipped")
                continue
            for step, argv in (("training", need_train and train_command(sweep, c)),
                               ("answering", need_answers and generate_command(sweep, c))):
                if not argv:
                    continue
                stop_if_asked(sweep, child, only)
                log(f"sweep: [{k}/{len(todo)}] {c.name}: {step}")
                set_state(sweep, c, state=step)
                if not end_of_step(sweep, c, child, child.run(argv), failed, only):
                    break
            else:
                set_state(sweep, c, state="done", exit_code=0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if failed:
        raise RuntimeFailure(f"sweep: {len(failed)} of {len(todo)} runs failed ({', '.join(failed)}); the others "
                             f"finished. Run again to retry them: {shlex.join(sweep.command(only))}")


def end_of_step(sweep: Sweep, c: Combination, child: Child, code: int, failed: list[str], only: str | None) -> bool:
    """Record how a run's command ended; True when the run goes on to its next step."""
    if code in (EXIT_SIGINT, EXIT_SIGTERM, -signal.SIGTERM, -signal.SIGINT) or (code and child.signum):
        set_state(sweep, c, state="interrupted", exit_code=code)
        stop_if_asked(sweep, child, only, during=c.name)
    if code:
        set_state(sweep, c, state="failed", exit_code=code)
        log(f"sweep: {c.name} failed (exit {code}); going on with the other runs")
        failed.append(c.name)
        return False
    return True


def stop_if_asked(sweep: Sweep, child: Child, only: str | None, during: str | None = None) -> None:
    if child.signum is None and during is None:
        return
    signum = child.signum or signal.SIGTERM
    code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    what = f" during {during} (its checkpoint is saved)" if during else ""
    raise Interrupted(f"sweep stopped by {signal.Signals(signum).name}{what}; continue with: "
                      f"{shlex.join(sweep.command(only))}", code)


def finished(sweep: Sweep, c: Combination) -> bool:
    return (sweep.run_dir(c) / "final").is_dir()


# --- results ---------------------------------------------------------------------------------------------------


def collect(sweep: Sweep) -> list[dict]:
    """compare's rows of the finished runs (answers columns where a run was answered), and the loss plot when
    matplotlib is there. A run not finished yet is named on stderr."""
    from neftune_cli.analysis.compare import compare_rows

    done = [c for c in sweep.combinations if finished(sweep, c)]
    missing = [c.name for c in sweep.combinations if c not in done]
    if not done:
        raise UsageError(f"{sweep.root}: no finished run of this sweep yet")
    if missing:
        log(f"sweep: not finished yet: {', '.join(missing)}")
    rows = []
    for c in done:
        answers = sweep.answers(c)
        rows += compare_rows([sweep.run_dir(c)], [answers] if answers.is_file() else [])
    try:
        import matplotlib  # noqa: F401 - the plot extra
    except ImportError:
        log("sweep: no loss plot (pip install 'neftune-cli[plot]' for one)")
    else:
        from neftune_cli.analysis.plot import plot_curves

        plot_curves([sweep.run_dir(c) for c in done], sweep.root / PLOT_FILE, overwrite=True)  # the sweep's own
        log(f"sweep: loss curves in {sweep.root / PLOT_FILE}")
    return rows


def print_commands(sweep: Sweep) -> None:
    """One self-contained command per run, one per line: each trains (or resumes) and answers its run."""
    for c in sweep.combinations:
        out.print(shlex.join(sweep.command(c.name)), markup=False, soft_wrap=True)
