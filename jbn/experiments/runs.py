"""A sweep's runs as found on disk, and what the reports measure on each one.

A run is a directory written by `jbn.experiments.sweep` (or ``train.py``):
``config.json``, ``metrics.jsonl`` (one record per epoch), ``status.json`` and,
when the config asked for them, ``evals.jsonl`` (test evaluations every N
steps, `jbn.train.step_eval`) and ``probe.jsonl`` (percentiles of an
intermediate value, `jbn.train.activation_probe`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jbn.experiments import sweep
from jbn.train import activation_probe, run_log, step_eval

__all__ = [
    "Run",
    "at_chance",
    "epochs_to_reach",
    "final_accuracy",
    "flat_config",
    "load_runs",
    "steps_to_reach",
    "test_curve",
]


@dataclasses.dataclass
class Run:
    """One variant of a sweep as found on disk.

    Attributes:
        name: The directory name (the variant's name).
        use_batch_norm: ``config.model.use_batch_norm``.
        learning_rate: ``config.optim.learning_rate`` (the peak of its schedule).
        records: The epoch records of ``metrics.jsonl``.
        status: ``"done"``, ``"diverged"`` or ``"unfinished"``.
        diverged_step: The first non-finite step of a diverged run.
        config: The run's ``config.json``.
        evals: The step-wise test evaluations (``evals.jsonl``; may be empty).
        probe: The probe records (``probe.jsonl``; may be empty).
        wall_time_s: Seconds the sweep spent on it (``status.json``), if known.
    """

    name: str
    use_batch_norm: bool
    learning_rate: float
    records: list[dict[str, Any]]
    status: str
    diverged_step: int | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    probe: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    wall_time_s: float | None = None

    @property
    def seed(self) -> int | None:
        """``config.seed``."""
        return self.config.get("seed")

    @property
    def num_classes(self) -> int:
        """``config.model.num_classes`` (10 if absent)."""
        return self.config.get("model", {}).get("num_classes", 10)


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Loads every run directory under ``root``, sorted by (BN first, learning rate, name).

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
                evals=step_eval.read(workdir),
                probe=activation_probe.read(workdir),
                wall_time_s=status.get("wall_time_s"),
            )
        )
    return sorted(runs, key=lambda r: (not r.use_batch_norm, r.learning_rate, r.name))


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.learning_rate": 0.1, ...}``: the leaves of a nested config (lists as tuples)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def epochs_to_reach(records: Sequence[dict[str, Any]], threshold: float) -> float | None:
    """The first epoch whose test accuracy is at least ``threshold``, or None."""
    for record in records:
        if record["test_accuracy"] >= threshold:
            return record["epoch"]
    return None


def test_curve(run: Run) -> list[tuple[int, float]]:
    """``(step, test accuracy)`` of every evaluation of a finite state, in step order.

    The step-wise evaluations where the run has them (they include the epoch
    ends), else the epoch records. Evaluations at or after a diverged run's
    first non-finite step are left out.
    """
    source = run.evals or run.records
    points = sorted((int(r["step"]), float(r["test_accuracy"])) for r in source)
    if run.diverged_step is not None:
        points = [(s, a) for s, a in points if s < run.diverged_step]
    return [(s, a) for s, a in points if math.isfinite(a)]


def steps_to_reach(run: Run, threshold: float) -> int | None:
    """The first evaluated step whose test accuracy is at least ``threshold``, or None."""
    for step, accuracy in test_curve(run):
        if accuracy >= threshold:
            return step
    return None


def final_accuracy(run: Run) -> float | None:
    """The last epoch record's test accuracy of a finished (``"done"``) run, else None."""
    if run.status != "done" or not run.records:
        return None
    return run.records[-1]["test_accuracy"]


def at_chance(run: Run, accuracy: float | None) -> bool:
    """Whether ``accuracy`` is within one point of guessing (1 / num_classes)."""
    return accuracy is not None and accuracy < 1 / run.num_classes + 0.01
