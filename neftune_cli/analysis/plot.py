"""`neftune plot`: train and eval loss curves of runs from their metrics.jsonl, one line per run, as a PNG."""

from __future__ import annotations

from pathlib import Path

from neftune_cli.io.atomic import atomic_file
from neftune_cli.io.errors import UsageError
from neftune_cli.io.outputs import check_output_file
from neftune_cli.train.metrics import read_metrics


def plot_curves(runs: list[Path], out: Path, *, overwrite: bool = False) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed (servers, CI)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("neftune plot needs matplotlib: pip install 'neftune-cli[plot]'") from None
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: expected a .png file")
    check_output_file(out, overwrite=overwrite, inputs=runs)
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        records = read_metrics(run)
        train = [r for r in records if r.get("loss") is not None]
        evals = [r for r in records if r.get("eval_loss") is not None]
        train_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=run.name)
        eval_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=run.name)
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_file(out, binary=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
