"""The markdown tables of a sweep report: one row per run, per cell, per BN comparison."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from jbn.experiments.runs import (
    Run,
    at_chance,
    epochs_to_reach,
    final_accuracy,
    steps_to_reach,
    test_curve,
)
from jbn.experiments.seeds import Comparison, Group, setting

__all__ = [
    "DEFAULT_THRESHOLDS",
    "comparison_table",
    "group_table",
    "markdown_table",
    "pct",
]

DEFAULT_THRESHOLDS = (0.60, 0.65)
_COLUMN_NAMES = {
    "model.name": "model",
    "model.activation": "activation",
    "model.widths": "widths",
    "data.batch_size": "batch",
    "model.virtual_batch_size": "ghost batch",
}


def pct(value: float | None) -> str:
    """``0.6123 -> "61.23%"``; None -> "–"."""
    return "–" if value is None else f"{100 * value:.2f}%"


def _points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: Sequence[str]) -> list[str]:
    return [_row(names), "|" + "---|" * len(names)]


def _batch_size(run: Run) -> int | None:
    return run.config.get("data", {}).get("batch_size")


def _ghost_size(run: Run) -> int | None:
    return run.config.get("model", {}).get("virtual_batch_size")


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(str(v) for v in value)
    return "–" if value is None else str(value)


def markdown_table(
    runs: Sequence[Run],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    step_thresholds: Sequence[float] = (),
) -> str:
    """The per-run results table in GitHub markdown.

    Final accuracy is the last epoch's, for finished runs only; best is the
    maximum over recorded epochs; images/s is the median over epochs.
    "Diverged" means a non-finite loss; a finished run whose final accuracy is
    within one point of chance (1 / num_classes) reads "no, at chance". A seed
    column appears when the runs' seeds differ, batch columns when batch or
    ghost-batch sizes do, and "steps to X%" columns for ``step_thresholds``.

    Args:
        runs: The runs, in row order.
        thresholds: Test accuracies (fractions) for the "epochs to reach" columns.
        step_thresholds: Test accuracies for the "steps to reach" columns
            (from the step-wise evaluations where a run has them).

    Returns:
        The table, one line per row, ending with a newline.
    """
    batches = {(_batch_size(r), _ghost_size(r)) for r in runs}
    show_batch = len(batches) > 1 or any(ghost is not None for _, ghost in batches)
    show_seed = len({r.seed for r in runs}) > 1
    header = ["variant"] + (["seed"] if show_seed else []) + ["BN", "peak lr"]
    header += ["batch", "ghost batch"] if show_batch else []
    header += ["final test acc", "best test acc"]
    header += [f"epochs to {100 * t:g}%" for t in thresholds]
    header += [f"steps to {100 * t:g}%" for t in step_thresholds]
    header += ["diverged", "images/s"]
    lines = _header(header)
    for run in runs:
        accs = [r["test_accuracy"] for r in run.records]
        final = final_accuracy(run)
        row = [run.name] + ([str(run.seed)] if show_seed else [])
        row += ["yes" if run.use_batch_norm else "no", f"{run.learning_rate:g}"]
        if show_batch:
            ghost = _ghost_size(run)
            row += [str(_batch_size(run)), "–" if ghost is None else str(ghost)]
        row += [pct(final), pct(max(accs) if accs else None)]
        for threshold in thresholds:
            epoch = epochs_to_reach(run.records, threshold)
            row.append("never" if epoch is None else f"{epoch:g}")
        for threshold in step_thresholds:
            step = steps_to_reach(run, threshold)
            row.append("never" if step is None else str(step))
        if run.status == "diverged":
            row.append(f"yes (step {run.diverged_step})")
        elif run.status != "done":
            row.append("unfinished")
        else:
            row.append("no, at chance" if at_chance(run, final) else "no")
        speeds = [r["images_per_sec"] for r in run.records]
        row.append(f"{statistics.median(speeds):.0f}" if speeds else "–")
        lines.append(_row(row))
    return "\n".join(lines) + "\n"


def group_table(
    groups: Sequence[Group], columns: Sequence[str], step_thresholds: Sequence[float]
) -> str:
    """One row per cell: mean, range and spread of the final accuracy over seeds, and more.

    Args:
        groups: The cells, in row order.
        columns: Setting fields shown as columns (those that vary besides BN and lr).
        step_thresholds: Test accuracies for the per-seed "steps to X%" columns.

    Returns:
        The table, ending with a newline.
    """
    header = ["cell", *(_COLUMN_NAMES.get(c, c) for c in columns), "BN", "peak lr", "seeds"]
    header += ["final test acc: mean (min–max)", "spread (points)", "best test acc: mean"]
    header += [f"steps to {100 * t:g}% (per seed)" for t in step_thresholds]
    header += ["diverged", "at chance", "wall s/run"]
    lines = _header(header)
    for group in groups:
        values = setting(group.runs[0])
        finals = group.finals()
        final = "–"
        if finals:
            final = f"{pct(group.mean())} ({_points(min(finals))}–{_points(max(finals))})"
        bests = [max(a for _, a in curve) for run in group.runs if (curve := test_curve(run))]
        row = [group.name, *(_value(values.get(c)) for c in columns)]
        row += ["yes" if group.use_batch_norm else "no", f"{group.learning_rate:g}"]
        row += [", ".join(str(s) for s in group.seeds), final, _points(group.spread())]
        row.append(pct(statistics.fmean(bests)) if bests else "–")
        for threshold in step_thresholds:
            steps = [steps_to_reach(run, threshold) for run in group.runs]
            row.append(", ".join("never" if s is None else str(s) for s in steps))
        diverged = [run for run in group.runs if run.status == "diverged"]
        steps = ", ".join(str(run.diverged_step) for run in diverged)
        row.append(f"{len(diverged)}/{len(group.runs)}" + (f" (step {steps})" if steps else ""))
        chance = sum(at_chance(run, final_accuracy(run)) for run in group.runs)
        row.append(f"{chance}/{len(group.runs)}")
        walls = [run.wall_time_s for run in group.runs if run.wall_time_s]
        row.append(f"{statistics.fmean(walls):.0f}" if walls else "–")
        lines.append(_row(row))
    return "\n".join(lines) + "\n"


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    """One row per setting trained with and without BN: the difference and its significance."""
    header = ["setting", "with BN: mean (min–max)", "without BN: mean (min–max)"]
    header += ["BN − no BN (points)", "larger spread (points)", "exceeds seed spread"]
    lines = _header(header)
    for comparison in comparisons:
        cells = []
        for group in (comparison.with_bn, comparison.without_bn):
            finals = group.finals()
            text = "–"
            if finals:
                text = f"{pct(group.mean())} ({_points(min(finals))}–{_points(max(finals))})"
            cells.append(f"{text}, {len(finals)} run(s)")
        difference = comparison.difference()
        exceeds = comparison.exceeds_spread()
        verdict = {True: "**yes**", False: "no", None: "cannot tell (one seed)"}[exceeds]
        shown = "–" if difference is None else f"{100 * difference:+.2f}"
        spread = _points(comparison.larger_spread())
        lines.append(_row([comparison.label, *cells, shown, spread, verdict]))
    return "\n".join(lines) + "\n"
