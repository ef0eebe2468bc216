"""Report of a sweep: a markdown table and learning-curve plots from the runs' metrics.

Usage::

    python -m jbn.report runs/bn_vs_lr --out docs/experiments/bn_vs_lr

Reads every ``root/<variant>/`` written by `jbn.experiments.sweep` (``metrics.jsonl``,
``config.json``, ``status.json``) and writes into ``--out``:

- ``README.md``: one row per variant (BatchNorm or not, peak LR, batch and
  ghost batch sizes when they vary, final and best test accuracy, epochs to reach each threshold, diverged or not, median
  training images/s), the plots, the training setup and the exact commands
  (from ``root/sweep_log.jsonl`` and this command; an absolute data directory
  becomes ``/path/to/<its name>``, so no machine's paths enter the docs).
- ``test_accuracy.png`` and ``train_loss.png`` against epochs: BatchNorm runs
  solid, runs without dashed, one colour per learning rate (per run where
  BN and learning rate do not tell the runs apart; matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jbn.experiments import sweep  # noqa: E402
from jbn.train import run_log  # noqa: E402

__all__ = [
    "Run",
    "epochs_to_reach",
    "load_runs",
    "main",
    "markdown_table",
    "portable_command",
    "write_report",
]

ACCURACY_PLOT = "test_accuracy.png"
LOSS_PLOT = "train_loss.png"
REPORT_FILE = "README.md"
DEFAULT_THRESHOLDS = (0.60, 0.65)


@dataclasses.dataclass
class Run:
    """One variant of a sweep as found on disk."""

    name: str
    use_batch_norm: bool
    learning_rate: float
    records: list[dict[str, Any]]
    status: str  # "done", "diverged" or "unfinished".
    diverged_step: int | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Loads every run directory under ``root``, sorted by (BN first, learning rate).

    Args:
        root: The sweep root; each subdirectory with a ``config.json`` is a run.

    Returns:
        The runs.
    """
    runs = []
    for workdir in sorted(pathlib.Path(root).iterdir()):
        config_path = workdir / "config.json"
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        status = sweep.read_status(workdir) or {}
        state = status.get("status", "unfinished")
        runs.append(
            Run(
                name=workdir.name,
                use_batch_norm=bool(config["model"]["use_batch_norm"]),
                learning_rate=float(config["optim"]["learning_rate"]),
                records=run_log.read(workdir),
                status=state,
                diverged_step=status.get("step") if state == "diverged" else None,
                config=config,
            )
        )
    return sorted(runs, key=lambda r: (not r.use_batch_norm, r.learning_rate, r.name))


def epochs_to_reach(records: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """The first epoch whose test accuracy is at least ``threshold``, or None."""
    for record in records:
        if record["test_accuracy"] >= threshold:
            return record["epoch"]
    return None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _batch_size(run: Run) -> int | None:
    return run.config.get("data", {}).get("batch_size")


def _ghost_size(run: Run) -> int | None:
    return run.config.get("model", {}).get("virtual_batch_size")


def _at_chance(run: Run, accuracy: float | None) -> bool:
    """Final test accuracy within one point of guessing (finite but collapsed)."""
    num_classes = run.config.get("model", {}).get("num_classes", 10)
    return accuracy is not None and accuracy < 1 / num_classes + 0.01


def markdown_table(runs: Sequence[Run], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> str:
    """The results table in GitHub markdown.

    Final accuracy is the last epoch's, for finished runs only; best is the
    maximum over recorded epochs; images/s is the median over epochs.
    "Diverged" means a non-finite loss; a finished run whose final accuracy is
    within one point of chance (1 / num_classes) reads "no, at chance".

    Args:
        runs: The runs, in row order.
        thresholds: Test accuracies (fractions) for the "epochs to reach" columns.

    Returns:
        The table, one line per row, ending with a newline.
    """
    batches = {(_batch_size(r), _ghost_size(r)) for r in runs}
    show_batch = len(batches) > 1 or any(ghost is not None for _, ghost in batches)
    header = ["variant", "BN", "peak lr"]
    header += ["batch", "ghost batch"] if show_batch else []
    header += ["final test acc", "best test acc"]
    header += [f"epochs to {100 * t:g}%" for t in thresholds]
    header += ["diverged", "images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        accs = [r["test_accuracy"] for r in run.records]
        final = accs[-1] if accs and run.status == "done" else None
        row = [run.name, "yes" if run.use_batch_norm else "no", f"{run.learning_rate:g}"]
        if show_batch:
            ghost = _ghost_size(run)
            row += [str(_batch_size(run)), "–" if ghost is None else str(ghost)]
        row += [_pct(final), _pct(max(accs) if accs else None)]
        for threshold in thresholds:
            epoch = epochs_to_reach(run.records, threshold)
            row.append("never" if epoch is None else f"{epoch:g}")
        if run.status == "diverged":
            row.append(f"yes (step {run.diverged_step})")
        elif run.status != "done":
            row.append("unfinished")
        else:
            row.append("no, at chance" if _at_chance(run, final) else "no")
        speeds = [r["images_per_sec"] for r in run.records]
        row.append(f"{statistics.median(speeds):.0f}" if speeds else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot(runs: Sequence[Run], key: str, ylabel: str, out: pathlib.Path, scale: float) -> None:
    # Colour by learning rate when (BN, lr) tells the runs apart, else by run.
    by_lr = len({(r.use_batch_norm, r.learning_rate) for r in runs}) == len(runs)
    keys = sorted({r.learning_rate for r in runs}) if by_lr else [r.name for r in runs]
    cmap = plt.get_cmap("viridis" if by_lr else "tab10")
    # Viridis up to 0.85: its last, pale yellow is hard to see on white.
    colors = {k: cmap(0.85 * i / max(len(keys) - 1, 1) if by_lr else i) for i, k in enumerate(keys)}
    fig, ax = plt.subplots(figsize=(10, 5))
    for run in runs:
        label = f"{'BN' if run.use_batch_norm else 'no BN'}, lr {run.learning_rate:g}"
        label = label if by_lr else f"{run.name} ({label})"
        if run.status == "diverged":
            label += f" (diverged, step {run.diverged_step})"
        epochs = [r["epoch"] for r in run.records]
        values = [scale * r[key] for r in run.records]
        ax.plot(
            epochs,
            values,
            color=colors[run.learning_rate if by_lr else run.name],
            ls="-" if run.use_batch_norm else "--",
            marker="o" if run.use_batch_norm else "s",
            markersize=4,
            label=label,
        )
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _setup(runs: Sequence[Run]) -> str:
    config = runs[0].config
    optim, data = config["optim"], config["data"]
    sizes = {_batch_size(r) for r in runs}
    batch = f"batch {data['batch_size']}" if len(sizes) == 1 else "batch as in the table"
    return (
        f"Every run: seed {config['seed']}, {config['num_epochs']} epochs, {batch}, "
        f"augmentation {data['augment']}, {optim['name']} "
        f"(momentum {optim['momentum']}, nesterov {optim['nesterov']}, weight decay "
        f"{optim['weight_decay']}), {optim['schedule']} schedule peaking at the run's lr."
    )


def portable_command(command: str) -> str:
    """``command`` with every absolute ``...data_dir`` value as ``/path/to/<its name>``.

    Example:
        >>> portable_command("python -m jbn.sweep --sweep.base.data.data_dir=/home/me/cifar")
        'python -m jbn.sweep --sweep.base.data.data_dir=/path/to/cifar'
    """
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        flag, equals, value = token.partition("=")
        if not flag.startswith("--") or not flag.endswith("data_dir"):
            continue
        if equals and os.path.isabs(value):
            tokens[i] = f"{flag}=/path/to/{pathlib.PurePath(value).name}"
        elif not equals and i + 1 < len(tokens) and os.path.isabs(tokens[i + 1]):
            tokens[i + 1] = f"/path/to/{pathlib.PurePath(tokens[i + 1]).name}"
    return shlex.join(tokens)


def write_report(
    root: str | os.PathLike,
    out: str | os.PathLike,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    report_command: str | None = None,
) -> pathlib.Path:
    """Writes the markdown report and the two plots for the sweep under ``root``.

    Args:
        root: The sweep root (see `load_runs`).
        out: Output directory (created).
        thresholds: See `markdown_table`.
        report_command: The command line that produced the report, listed with
            the sweep's commands.

    Returns:
        The path of the markdown file.

    Raises:
        ValueError: If ``root`` holds no runs.
    """
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"No runs (directories with config.json) under {root}.")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, "test_accuracy", "test accuracy (%)", out / ACCURACY_PLOT, 100.0)
    _plot(runs, "train_loss", "training loss (epoch mean)", out / LOSS_PLOT, 1.0)

    log_path = pathlib.Path(root) / sweep.SWEEP_LOG_FILE
    log = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.exists()
        else []
    )
    commands = [portable_command(entry["command"]) for entry in log]
    if report_command:
        commands.append(report_command)
    wall = sum(entry["wall_time_s"] for entry in log)
    lines = [
        f"# Sweep `{pathlib.Path(root).name}`",
        "",
        _setup(runs),
        "",
        markdown_table(runs, thresholds),
        "Final: last epoch's test accuracy (finished runs only). Best: over recorded epochs. "
        "Epochs to X%: first evaluated epoch at or above X%. Diverged: a non-finite loss "
        "stopped the run; 'no, at chance': finite but final accuracy within 1 point of "
        "chance. images/s: median training throughput over epochs (other jobs shared "
        "the 2 CPU cores, so it is noisy).",
        "",
        f"![test accuracy]({ACCURACY_PLOT})",
        "",
        f"![training loss]({LOSS_PLOT})",
        "",
        "## Commands",
        "",
    ]
    if log:
        failed = sum("error" in entry for entry in log)
        note = f", {failed} stopped by an error" if failed else ""
        lines += [f"Sweep wall time: {wall:.0f} s over {len(log)} invocation(s){note}.", ""]
    lines += ["```bash", *commands, "```", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="sweep root (holds one directory per variant)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--thresholds",
        default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
        help="comma-separated test accuracies for the epochs-to columns (default: 0.6,0.65)",
    )
    args = parser.parse_args(argv)
    command = "python -m jbn.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    path = write_report(args.root, args.out, thresholds, report_command=command)
    print(path.read_text())


if __name__ == "__main__":
    main()
