"""Runs that differ only by seed, their spread, and which differences exceed it.

A *group* (one cell of a sweep) is the runs whose configs agree on every
setting but the seed; bookkeeping fields that do not change what is trained
(data directory, checkpoint and log cadence, prefetching, the device mesh,
kernel choices) are ignored too. Its *final accuracies* are the last epoch's
test accuracy of each finished run, a diverged run counting as chance
(1 / num_classes: a network of NaNs predicts class 0); unfinished runs are
left out. Its *spread* is the range (max - min) of those accuracies over
seeds.

A difference between two groups *exceeds the seed spread* when their ranges
do not overlap (every seed of one above every seed of the other); with one
seed on either side it cannot be told. With two or three seeds per cell this
is a coarse criterion, stated as such in the reports.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from jbn.experiments.runs import Run, final_accuracy, flat_config

__all__ = [
    "BOOKKEEPING_FIELDS",
    "Comparison",
    "Group",
    "bn_comparisons",
    "describe_setting",
    "group_by_seed",
    "seed_spread",
    "setting",
    "varying_fields",
]

# Fields that do not change what a run trains (the seed is what groups vary in).
BOOKKEEPING_FIELDS = (
    "seed",
    "data.data_dir",
    "data.download",
    "data.prefetch",
    "data.eval_batch_size",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "mesh.data",
    "model.native_input_conv",
    "model.patch_conv_channels",
    "eval_every_steps",
)
_BOOKKEEPING_PREFIXES = ("log.", "probe.")
_SEED_PART = re.compile(r"^seed\d+[_-]|[_-]?seed\d+$")
# How describe_setting shows a field: "lr 0.1"; "" shows the value alone ("plain20").
_SHORT_NAMES = {
    "optim.learning_rate": "lr",
    "model.use_batch_norm": "BN",
    "model.name": "",
    "model.activation": "",
}


def setting(run: Run, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The run's flat config without the bookkeeping fields and ``ignore``."""
    skipped = set(BOOKKEEPING_FIELDS) | set(ignore)
    return {
        key: value
        for key, value in flat_config(run.config).items()
        if key not in skipped and not key.startswith(_BOOKKEEPING_PREFIXES)
    }


def _key(run: Run, ignore: Iterable[str] = ()) -> str:
    return json.dumps(setting(run, ignore), sort_keys=True, default=str)


@dataclasses.dataclass
class Group:
    """The runs of one cell: same setting, different seeds."""

    name: str
    runs: list[Run]

    @property
    def config(self) -> dict[str, Any]:
        """The config of the first run (equal to the others' but for the seed)."""
        return self.runs[0].config

    @property
    def use_batch_norm(self) -> bool:
        """``config.model.use_batch_norm``."""
        return self.runs[0].use_batch_norm

    @property
    def learning_rate(self) -> float:
        """``config.optim.learning_rate``."""
        return self.runs[0].learning_rate

    @property
    def seeds(self) -> list[int | None]:
        """The runs' seeds, in run order."""
        return [run.seed for run in self.runs]

    def finals(self) -> list[float]:
        """Final test accuracy per finished run, a diverged run at chance (see the module)."""
        values = []
        for run in self.runs:
            if run.status == "diverged":
                values.append(1 / run.num_classes)
            elif (accuracy := final_accuracy(run)) is not None:
                values.append(accuracy)
        return values

    def mean(self) -> float | None:
        """Mean of `finals`, or None without a finished run."""
        values = self.finals()
        return statistics.fmean(values) if values else None

    def spread(self) -> float | None:
        """Range of `finals` over seeds, or None with fewer than two finished runs."""
        values = self.finals()
        return max(values) - min(values) if len(values) >= 2 else None


def group_by_seed(runs: Sequence[Run]) -> list[Group]:
    """Groups the runs that differ only by seed, in the order of their first run.

    A group is named after its first run without its ``seed<k>_`` prefix or
    ``_seed<k>`` suffix.
    """
    groups: dict[str, Group] = {}
    for run in runs:
        key = _key(run)
        if key not in groups:
            groups[key] = Group(_SEED_PART.sub("", run.name) or run.name, [])
        groups[key].runs.append(run)
    return list(groups.values())


def seed_spread(groups: Sequence[Group]) -> tuple[float, float, int] | None:
    """``(median, max, number of groups)`` of the spreads of groups with two or more runs."""
    spreads = [s for group in groups if (s := group.spread()) is not None]
    if not spreads:
        return None
    return statistics.median(spreads), max(spreads), len(spreads)


def varying_fields(groups: Sequence[Group], ignore: Iterable[str] = ()) -> list[str]:
    """The setting fields whose value differs between groups, sorted."""
    ignore = set(ignore)
    settings = [setting(group.runs[0]) for group in groups]
    keys = set().union(*settings) if settings else set()
    return sorted(
        key
        for key in keys - ignore
        if len({json.dumps(s.get(key), default=str) for s in settings}) > 1
    )


def describe_setting(group: Group, fields: Sequence[str]) -> str:
    """``"plain20, lr 0.1, data.batch_size=64"``: the group's values of ``fields``."""
    values = setting(group.runs[0])
    parts = []
    for field in fields:
        value = values.get(field)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        short = _SHORT_NAMES.get(field)
        parts.append(f"{field}={shown}" if short is None else f"{short} {shown}".strip())
    return ", ".join(parts)


@dataclasses.dataclass
class Comparison:
    """A cell trained with and without BatchNorm, everything else equal."""

    label: str
    with_bn: Group
    without_bn: Group

    def difference(self) -> float | None:
        """Mean final accuracy with BN minus without (None if either has none)."""
        a, b = self.with_bn.mean(), self.without_bn.mean()
        return None if a is None or b is None else a - b

    def larger_spread(self) -> float | None:
        """The larger of the two groups' spreads (None if either is unknown)."""
        a, b = self.with_bn.spread(), self.without_bn.spread()
        return None if a is None or b is None else max(a, b)

    def exceeds_spread(self) -> bool | None:
        """Whether the two groups' seed ranges do not overlap (None: a side has < 2 runs)."""
        a, b = self.with_bn.finals(), self.without_bn.finals()
        if len(a) < 2 or len(b) < 2:
            return None
        return min(a) > max(b) or min(b) > max(a)


def bn_comparisons(groups: Sequence[Group]) -> list[Comparison]:
    """Pairs every BN group with the no-BN group of the same setting, in group order."""
    ignore = ("model.use_batch_norm",)
    without = {_key(g.runs[0], ignore): g for g in groups if not g.use_batch_norm}
    fields = varying_fields(groups, ignore=ignore)
    pairs = []
    for group in groups:
        if group.use_batch_norm and (other := without.get(_key(group.runs[0], ignore))):
            pairs.append(Comparison(describe_setting(group, fields) or "all", group, other))
    return pairs
