"""What ``neftune data clean`` shows: a rich table on a terminal, plain lines otherwise; a progress bar on a
terminal for long runs, a log line per phase otherwise (stderr, so stdout stays the summary)."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neftune_cli.io import console

LONG_RUN = 10_000  # records: fewer finish before a bar would be worth drawing


def lines(report: dict) -> list[str]:
    out = []
    for name, f in report["filters"].items():
        if not f["enabled"]:
            continue
        example = f["examples"][0] if f["examples"] else None
        shown = f"  e.g. {example['where']}: {example['reason']}" if example else ""
        out.append(f"{name}: {f['removed']:,} removed{shown}")
    for i in report["inputs"]:
        target = f" -> {i['out']}" if i["out"] else " (dry run: nothing written)"
        out.append(f"{i['path']} [{i['format']}]: kept {i['kept']:,} of {i['records']:,}{target}")
    out.append(f"kept {report['kept']:,} of {report['records']:,} records, removed {report['removed']:,}")
    return out


def table(report: dict) -> Table:
    t = Table(title=f"kept {report['kept']:,} of {report['records']:,} records", title_justify="left")
    t.add_column("filter")
    t.add_column("removed", justify="right")
    t.add_column("first example", overflow="fold")
    for name, f in report["filters"].items():
        if f["enabled"]:
            example = f["examples"][0] if f["examples"] else None
            t.add_row(name, f"{f['removed']:,}", f"{example['where']}: {example['reason']}" if example else "")
    return t


def show(report: dict) -> None:
    if console.stdout_is_tty():
        console.out.print(table(report))
        for i in report["inputs"]:
            console.out.print(f"{i['path']} -> {i['out'] or '(dry run)'}: kept {i['kept']:,} of {i['records']:,}",
                              markup=False)
    else:
        for line in lines(report):
            console.out.print(line, markup=False)


class Phases:
    """The clean.Progress callback: a bar per phase on a terminal, else one log line when a phase ends."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console.err) if sys.stderr.isatty() else None
        self.tasks: dict[str, int] = {}
        self.started = time.perf_counter()

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self.bar is not None:
            if phase not in self.tasks:
                if (total if total is not None else done) < LONG_RUN:
                    return  # short so far: no bar
                self.bar.start()
                self.tasks[phase] = self.bar.add_task(phase, total=total)
            self.bar.update(self.tasks[phase], completed=done, total=total)
        elif total is not None and done == total:
            console.log(f"clean: {phase} {total:,} records, {time.perf_counter() - self.started:.1f} s")
