"""Training progress: a rich bar on a terminal, plain log lines for scripts, CI and nohup."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from neftune_cli.io.console import out


class Progress:
    def __init__(self, total_steps: int, start_step: int, *, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=out,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, step: int, m: dict, tokens_per_s: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step,
                            stats=f"loss {m['loss']:.4f} lr {m['lr']:.2e} {tokens_per_s:,.0f} tok/s")

    def log(self, line: str) -> None:
        """A periodic metrics line: printed only without a bar (the bar already shows it)."""
        if not self.bar:
            out.print(line, markup=False)

    def print(self, line: str) -> None:
        """A line worth keeping in both modes (evals)."""
        out.print(line, markup=False)
