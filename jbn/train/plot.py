"""Learning curves of one or several runs from their ``metrics.jsonl``.

Usage::

    python -m jbn.plot workdir1 [workdir2 ...] [--out curves.png]

Draws test accuracy and train/test loss against epochs, one line per run
(labelled by the workdir name), side by side in one PNG (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jbn.train import run_log  # noqa: E402

__all__ = ["main", "plot_runs"]


def plot_runs(
    workdirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str] | None = None,
) -> pathlib.Path:
    """Plots the learning curves of ``workdirs`` into the PNG ``out``.

    Args:
        workdirs: Run directories holding ``metrics.jsonl``.
        out: Output image path.
        labels: Legend label per run (default: the directory names).

    Returns:
        The path written.

    Raises:
        ValueError: If a workdir has no metrics.
    """
    labels = list(labels) if labels is not None else [pathlib.Path(w).name for w in workdirs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for workdir, label in zip(workdirs, labels, strict=True):
        records = run_log.read(workdir)
        if not records:
            raise ValueError(f"No {run_log.METRICS_FILE} records in {workdir}.")
        epochs = [r["epoch"] for r in records]
        (line,) = ax_acc.plot(
            epochs, [100 * r["test_accuracy"] for r in records], marker="o", label=label
        )
        color = line.get_color()
        ax_loss.plot(
            epochs, [r["train_loss"] for r in records], color=color, label=f"{label} train"
        )
        ax_loss.plot(
            epochs, [r["test_loss"] for r in records], color=color, ls="--", label=f"{label} test"
        )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="run directories with metrics.jsonl")
    parser.add_argument("--out", default="curves.png", help="output PNG (default: curves.png)")
    args = parser.parse_args(argv)
    print(plot_runs(args.workdirs, args.out))


if __name__ == "__main__":
    main()
