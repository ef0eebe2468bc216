"""The plots of a sweep report (matplotlib, Agg).

Curves against epochs and against steps, final accuracy against learning
rate, and the probe's percentiles over training (the BatchNorm paper's Figure 1).

Line conventions everywhere: BatchNorm runs solid, runs without dashed; one
colour per learning rate (viridis) where the runs have several, else one per
BatchNorm setting; the seeds of a cell share its colour and style. Cells that
differ in anything else (the model, say) get a panel each.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jbn.experiments.runs import Run, final_accuracy, test_curve  # noqa: E402
from jbn.experiments.seeds import Group, describe_setting  # noqa: E402

__all__ = ["plot_accuracy_vs_steps", "plot_epochs", "plot_final_vs_lr", "plot_probe"]


def _save(fig: Any, out: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_epochs(
    runs: Sequence[Run], key: str, ylabel: str, out: pathlib.Path, scale: float
) -> None:
    """One line per run of epoch-record ``key`` (times ``scale``) against epochs.

    Colours go by learning rate when (BN, lr) tells the runs apart, else by run.
    """
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
    _save(fig, out)


def _facets(groups: Sequence[Group], fields: Sequence[str]) -> dict[str, list[Group]]:
    facets: dict[str, list[Group]] = {}
    for group in groups:
        facets.setdefault(describe_setting(group, fields), []).append(group)
    return facets


def _panels(count: int, width: float = 6.0, height: float = 4.5) -> list:
    """A figure of ``count`` panels, three a row, sharing both axes."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    size = (width * cols, height * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return [fig, list(axes.flat[:count])]


def _style(groups: Sequence[Group]) -> dict[int, dict[str, Any]]:
    """Colour and line style per group (by ``id``), shared across panels."""
    rates = sorted({g.learning_rate for g in groups})
    cmap = plt.get_cmap("viridis")
    styles = {}
    for group in groups:
        if len(rates) > 1:
            color = cmap(0.85 * rates.index(group.learning_rate) / (len(rates) - 1))
        else:
            color = "C0" if group.use_batch_norm else "C3"
        styles[id(group)] = {"color": color, "ls": "-" if group.use_batch_norm else "--"}
    return styles


def _label(group: Group) -> str:
    diverged = sum(run.status == "diverged" for run in group.runs)
    note = f", {diverged}/{len(group.runs)} diverged" if diverged else ""
    return f"{'BN' if group.use_batch_norm else 'no BN'}, lr {group.learning_rate:g}{note}"


def plot_accuracy_vs_steps(
    groups: Sequence[Group], facet_fields: Sequence[str], out: pathlib.Path
) -> None:
    """Test accuracy against training steps, every seed of every cell, a panel per facet."""
    facets = _facets(groups, facet_fields)
    styles = _style(groups)
    fig, axes = _panels(len(facets))
    for ax, (title, members) in zip(axes, facets.items(), strict=True):
        for group in members:
            for i, run in enumerate(group.runs):
                points = test_curve(run)
                ax.plot(
                    [s for s, _ in points],
                    [100 * a for _, a in points],
                    lw=1.2,
                    alpha=0.85,
                    label=_label(group) if i == 0 else None,
                    **styles[id(group)],
                )
        ax.set(xlabel="training step", ylabel="test accuracy (%)", title=title or None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, out)


def plot_final_vs_lr(
    groups: Sequence[Group], facet_fields: Sequence[str], out: pathlib.Path
) -> None:
    """Final test accuracy against peak learning rate: a dot per seed, a line through the means.

    Diverged runs are drawn as crosses at chance.
    """
    facets = _facets(groups, facet_fields)
    fig, axes = _panels(len(facets))
    for ax, (title, members) in zip(axes, facets.items(), strict=True):
        for use_bn, color in ((True, "C0"), (False, "C3")):
            cells = sorted(
                (g for g in members if g.use_batch_norm == use_bn), key=lambda g: g.learning_rate
            )
            means = [(g.learning_rate, g.mean()) for g in cells if g.mean() is not None]
            if not means:
                continue
            ls = "-" if use_bn else "--"
            label = "BN" if use_bn else "no BN"
            xs, ys = [x for x, _ in means], [100 * y for _, y in means]
            ax.plot(xs, ys, color=color, ls=ls, label=f"{label} (mean over seeds)")
            for group in cells:
                for run in group.runs:
                    accuracy = final_accuracy(run)
                    if run.status == "diverged":
                        ax.plot(group.learning_rate, 100 / run.num_classes, "x", color=color, ms=8)
                    elif accuracy is not None:
                        ax.plot(group.learning_rate, 100 * accuracy, "o", color=color, ms=4)
        ax.set_xscale("log")
        ax.set(xlabel="peak learning rate", ylabel="final test accuracy (%)", title=title or None)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    _save(fig, out)


def plot_probe(groups: Sequence[Group], out: pathlib.Path) -> None:
    """The probe's percentiles against steps, a panel per cell (seeds share colours)."""
    probed = [g for g in groups if any(run.probe for run in g.runs)]
    fig, axes = _panels(len(probed), width=5.5)
    for ax, group in zip(axes, probed, strict=True):
        first = next(run.probe[0] for run in group.runs if run.probe)
        keys = [k for k in first if k.startswith("p") and k[1:].replace(".", "").isdigit()]
        keys.sort(key=lambda k: float(k[1:]))
        for i, run in enumerate(r for r in group.runs if r.probe):
            steps = [r["step"] for r in run.probe]
            for j, key in enumerate(keys):
                label = f"{key[1:]}th percentile" if i == 0 else None
                values = [r[key] for r in run.probe]
                width, alpha = (1.5, 1.0) if i == 0 else (0.8, 0.5)
                ax.plot(steps, values, color=f"C{j}", lw=width, alpha=alpha, label=label)
        unit = "all units" if first.get("unit") is None else f"unit {first['unit']}"
        ax.set(
            xlabel="training step",
            ylabel=f"{first['intermediate']} ({unit})",
            title=f"{group.name}: {'BN' if group.use_batch_norm else 'no BN'}, "
            f"{len(group.runs)} seed(s)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, out)
