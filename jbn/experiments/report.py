"""Report of a sweep: markdown tables and plots from the runs' metrics.

Usage::

    python -m jbn.report runs/bn_vs_lr --out docs/experiments/bn_vs_lr \
        [--thresholds 0.6,0.65] [--notes docs/experiments/bn_vs_lr/notes.md]

Reads every ``root/<variant>/`` written by `jbn.experiments.sweep` (see
`jbn.experiments.runs`) and writes into ``--out`` a ``README.md`` with the
training setup, the results, the plots and the exact commands (from
``root/sweep_log.jsonl`` and this command, absolute paths replaced by
relative ones or placeholders), and the plots as PNG files.

Two layouts:

- One run per cell and no step-wise data (``bn_vs_lr``, ``ghost_bn``): one
  row per variant (BatchNorm or not, peak LR, batch and ghost batch sizes when
  they vary, final and best test accuracy, epochs to reach each threshold,
  diverged or not, median images/s) and ``test_accuracy.png`` /
  ``train_loss.png`` against epochs.
- Cells with several seeds, or runs with step-wise evaluations or a probe: a
  table per cell (mean, range and spread of the final accuracy over seeds,
  steps to each threshold per seed, divergence, wall time; `jbn.experiments.seeds`),
  BatchNorm against no BatchNorm with whether each difference exceeds the seed
  spread, then ``test_accuracy_steps.png`` (accuracy against steps),
  ``final_accuracy_lr.png`` (against the learning rate, when it varies),
  ``probe_percentiles.png`` (the probe, when recorded), ``train_loss.png``
  (when runs have several epochs), and the per-run table.

``--notes`` puts a markdown file (the conclusions, written by hand) under the
title, so that regenerating the report keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
from collections.abc import Sequence

from jbn.experiments import figures, seeds, sweep
from jbn.experiments.runs import Run, epochs_to_reach, load_runs
from jbn.experiments.tables import (
    DEFAULT_THRESHOLDS,
    comparison_table,
    group_table,
    markdown_table,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
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
STEPS_PLOT = "test_accuracy_steps.png"
LR_PLOT = "final_accuracy_lr.png"
PROBE_PLOT = "probe_percentiles.png"
REPORT_FILE = "README.md"

_EPOCHS_NOTE = "Epochs to X%: first evaluated epoch at or above X%. "
_STEPS_NOTE = "Steps to X%: first evaluated step at or above X%. "


def _run_note(columns: str) -> str:
    """The per-run table's footnote; ``columns`` explains its threshold columns."""
    return (
        "Final: last epoch's test accuracy (finished runs only). Best: over recorded epochs. "
        f"{columns}Diverged: a non-finite loss "
        "stopped the run; 'no, at chance': finite but final accuracy within 1 point of "
        "chance. images/s: median training throughput over epochs (other jobs shared "
        "the 2 CPU cores, so it is noisy)."
    )


_GROUP_NOTE = (
    "A cell is the runs that differ only by seed. Final: last epoch's test accuracy, "
    "a diverged run counted at chance; mean over seeds with the lowest and highest "
    "seed. Spread: highest minus lowest, in points. Best: the highest evaluated test "
    "accuracy, mean over seeds. Steps to X%: first evaluated step at or above X%, per "
    "seed. At chance: finished with a final accuracy within 1 point of chance. "
    "Wall: mean seconds per run as the sweep timed it (other jobs may have shared the "
    "machine)."
)


def portable_command(command: str, cwd: str | os.PathLike | None = None) -> str:
    """``command`` with every absolute path made relative to ``cwd`` or a placeholder.

    A path under ``cwd`` (default: the working directory) becomes relative to
    it; any other becomes ``/path/to/<its last part>``, so a report shows no
    machine's directories. Paths count as arguments or as ``--flag=value`` values.
    """
    base = pathlib.Path(cwd or os.getcwd()).resolve()

    def portable(value: str) -> str:
        if not value.startswith("/"):
            return value
        path = pathlib.Path(value)
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            return f"/path/to/{path.name}"

    tokens = []
    for token in shlex.split(command):
        flag, equals, value = token.partition("=")
        tokens.append(f"{flag}={portable(value)}" if equals else portable(token))
    return shlex.join(tokens)


def _setup(runs: Sequence[Run]) -> str:
    config = runs[0].config
    optim, data = config["optim"], config["data"]
    sizes = {r.config["data"]["batch_size"] for r in runs}
    batch = f"batch {data['batch_size']}" if len(sizes) == 1 else "batch as in the table"
    run_seeds = sorted({r.seed for r in runs})
    every = "Every run"
    seed = f"seed {run_seeds[0]}, "
    if len(run_seeds) > 1:
        every, seed = f"Every run (seeds {_and_list(run_seeds)})", ""
    schedule = f"{optim['schedule']} schedule peaking at the run's lr"
    if optim["schedule"] == "constant":
        schedule = "constant learning rate (the run's lr)"
    text = (
        f"{every}: {seed}{_epochs(config['num_epochs'])}, {batch}, "
        f"augmentation {data['augment']}, {optim['name']} "
        f"(momentum {optim['momentum']}, nesterov {optim['nesterov']}, weight decay "
        f"{optim['weight_decay']}), {schedule}."
    )
    return " ".join([text, *_setup_extras(runs)])


def _setup_extras(runs: Sequence[Run]) -> list[str]:
    """Sentences for the settings beyond the seed workbench's (none for its runs)."""
    config = runs[0].config
    model, data = config["model"], config["data"]
    extras = []
    names = sorted({r.config["model"]["name"] for r in runs})
    if names != ["SmallBNConvNet"]:
        # widths: the MLP's hidden layers (the ResNets ignore the field).
        fields = ("widths", "activation") if names == ["mlp"] else ("activation",)
        common = [
            f"{field} {_fmt(model[field])}"
            for field in fields
            if field in model and len({str(r.config["model"].get(field)) for r in runs}) == 1
        ]
        model_text = f"Model {names[0]}" if len(names) == 1 else f"Models {_and_list(names)}"
        extras.append(model_text + (f" ({', '.join(common)})." if common else "."))
    if data.get("num_train_examples"):
        steps = data["num_train_examples"] // data["batch_size"]
        extras.append(
            f"Training on the first {data['num_train_examples']} training images "
            f"({steps} steps per epoch)."
        )
    if data.get("num_test_examples"):
        extras.append(f"Test accuracy on the first {data['num_test_examples']} test images.")
    if config.get("eval_every_steps"):
        extras.append(
            f"Test set evaluated at step 0, every {config['eval_every_steps']} steps and "
            "after every epoch."
        )
    probe = config.get("probe") or {}
    if probe.get("every_steps"):
        unit = "all units" if probe.get("unit") is None else f"unit {probe['unit']}"
        extras.append(
            f"Probe: percentiles {', '.join(f'{q:g}' for q in probe['percentiles'])} of "
            f"`{probe['intermediate']}` ({unit}) over the first {probe['num_examples']} test "
            f"images, in inference mode, at step 0 and every {probe['every_steps']} steps."
        )
    return extras


def _epochs(count: int) -> str:
    return "1 epoch" if count == 1 else f"{count} epochs"


def _and_list(values: Sequence[object]) -> str:
    """``[0, 1, 2] -> "0, 1 and 2"``."""
    texts = [str(v) for v in values]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def _fmt(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def _read_log(root: pathlib.Path) -> list[dict]:
    path = root / sweep.SWEEP_LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _commands(log: Sequence[dict], report_command: str | None) -> list[str]:
    commands = [portable_command(entry["command"]) for entry in log]
    if report_command:
        commands.append(portable_command(report_command))
    lines = ["## Commands", ""]
    if log:
        wall = sum(entry["wall_time_s"] for entry in log)
        failed = sum("error" in entry for entry in log)
        note = f", {failed} stopped by an error" if failed else ""
        lines += [f"Sweep wall time: {wall:.0f} s over {len(log)} invocation(s){note}.", ""]
    return [*lines, "```bash", *commands, "```", ""]


def _per_run_lines(runs: Sequence[Run], out: pathlib.Path, thresholds: Sequence[float]) -> list:
    figures.plot_epochs(runs, "test_accuracy", "test accuracy (%)", out / ACCURACY_PLOT, 100.0)
    figures.plot_epochs(runs, "train_loss", "training loss (epoch mean)", out / LOSS_PLOT, 1.0)
    return [
        markdown_table(runs, thresholds),
        _run_note(_EPOCHS_NOTE),
        "",
        f"![test accuracy]({ACCURACY_PLOT})",
        "",
        f"![training loss]({LOSS_PLOT})",
        "",
    ]


def _spread_sentence(groups: Sequence[seeds.Group]) -> str:
    spread = seeds.seed_spread(groups)
    if spread is None:
        return "Seed-to-seed spread: unknown (no cell has two finished runs)."
    median, largest, count = spread
    return (
        f"Seed-to-seed spread of the final test accuracy (highest minus lowest seed): "
        f"median {100 * median:.2f} points, largest {100 * largest:.2f}, over {count} cells."
    )


def _comparison_lines(groups: Sequence[seeds.Group]) -> list[str]:
    comparisons = seeds.bn_comparisons(groups)
    if not comparisons:
        return []
    exceeding = [c.label for c in comparisons if c.exceeds_spread()]
    within = [c.label for c in comparisons if c.exceeds_spread() is False]
    verdict = (
        f"Differences beyond the seed spread (the two cells' seed ranges do not overlap): "
        f"{'; '.join(exceeding) or 'none'}. Within it: {'; '.join(within) or 'none'}."
    )
    return [
        "## BatchNorm against no BatchNorm",
        "",
        comparison_table(comparisons),
        verdict + " With two or three seeds a cell this is a coarse test.",
        "",
    ]


def _grouped_lines(runs: Sequence[Run], out: pathlib.Path, thresholds: Sequence[float]) -> list:
    groups = seeds.group_by_seed(runs)
    facet_fields = seeds.varying_fields(
        groups, ignore=("model.use_batch_norm", "optim.learning_rate")
    )
    # Rows by the other settings (the model, say), then BN first, then learning rate.
    groups.sort(
        key=lambda g: (
            seeds.describe_setting(g, facet_fields),
            not g.use_batch_norm,
            g.learning_rate,
        )
    )
    stepwise = any(run.evals for run in runs)
    lines = [
        "## Results",
        "",
        group_table(groups, facet_fields, thresholds),
        _GROUP_NOTE,
        "",
        _spread_sentence(groups),
        "",
        *_comparison_lines(groups),
        "## Plots",
        "",
    ]
    figures.plot_accuracy_vs_steps(groups, facet_fields, out / STEPS_PLOT)
    lines += [f"![test accuracy against training steps]({STEPS_PLOT})", ""]
    if len({g.learning_rate for g in groups}) > 1:
        figures.plot_final_vs_lr(groups, facet_fields, out / LR_PLOT)
        lines += [f"![final test accuracy against peak learning rate]({LR_PLOT})", ""]
    if any(run.probe for run in runs):
        figures.plot_probe(groups, out / PROBE_PLOT)
        lines += [f"![probe percentiles over training]({PROBE_PLOT})", ""]
    if any(len(run.records) > 1 for run in runs):
        figures.plot_epochs(runs, "train_loss", "training loss (epoch mean)", out / LOSS_PLOT, 1.0)
        lines += [f"![training loss]({LOSS_PLOT})", ""]
    lines += [
        "## Every run",
        "",
        markdown_table(runs, (), thresholds if stepwise else ()),
        _run_note(_STEPS_NOTE if stepwise else ""),
        "",
    ]
    return lines


def write_report(
    root: str | os.PathLike,
    out: str | os.PathLike,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    report_command: str | None = None,
    notes: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Writes the markdown report and its plots for the sweep under ``root``.

    Args:
        root: The sweep root (see `load_runs`).
        out: Output directory (created).
        thresholds: Test accuracies (fractions) for the "epochs to" columns of
            the one-seed layout, the "steps to" columns of the other.
        report_command: The command line that produced the report, listed with
            the sweep's commands.
        notes: A markdown file put under the title (e.g. the conclusions).

    Returns:
        The path of the markdown file.

    Raises:
        ValueError: If ``root`` holds no runs.
    """
    root = pathlib.Path(root)
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"No runs (directories with config.json) under {root}.")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep `{root.name}`", ""]
    if notes is not None:
        lines += [pathlib.Path(notes).read_text().strip(), ""]
    lines += [_setup(runs), ""]
    grouped = any(run.evals or run.probe for run in runs) or len(seeds.group_by_seed(runs)) < len(
        runs
    )
    if grouped:
        lines += _grouped_lines(runs, out, thresholds)
    else:
        lines += _per_run_lines(runs, out, thresholds)
    lines += _commands(_read_log(root), report_command)
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
        help="comma-separated test accuracies for the epochs/steps-to columns (default: 0.6,0.65)",
    )
    parser.add_argument("--notes", help="markdown file to put under the title")
    args = parser.parse_args(argv)
    command = "python -m jbn.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    path = write_report(args.root, args.out, thresholds, report_command=command, notes=args.notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
