"""Running sums of an epoch's train metrics, carried through checkpoints.

The loop adds every step's ``loss`` and ``accuracy`` (float32 device scalars,
without waiting for them) and divides by the number of steps when the epoch
ends. The sums and their step count go into every checkpoint's ``progress``
(`jbn.train.checkpoint`), so a run resumed mid-epoch continues the same sums
and writes the same ``metrics.jsonl`` record as a straight run: float32
values survive the JSON round trip exactly, and the next addition is the same
float32 addition.

Example:
    >>> sums = EpochMetrics.resume(progress, step=200, steps_per_epoch=390)  # doctest: +SKIP
    >>> sums.add(metrics)  # doctest: +SKIP
    >>> checkpointer.save(step, state, sums.progress())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KEYS", "EpochMetrics"]

KEYS = ("loss", "accuracy")  # Summed train metrics; records hold train_<key> means.


class EpochMetrics:
    """The sums of ``KEYS`` over the steps of one epoch seen so far.

    Args:
        epoch: The epoch (0-based) the sums belong to.
        steps: Steps already summed.
        sums: Their sums (None when ``steps`` is 0).
    """

    def __init__(self, epoch: int, steps: int = 0, sums: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.steps = steps
        self._sums = sums

    @classmethod
    def resume(cls, progress: Mapping[str, Any], step: int, steps_per_epoch: int) -> EpochMetrics:
        """The sums of the epoch that ``step`` is in, from a checkpoint's ``progress``.

        Args:
            progress: The dict saved with the checkpoint of ``step`` (may be empty).
            step: The restored step.
            steps_per_epoch: Steps of one epoch.

        Returns:
            The restored sums when ``progress`` holds those of this epoch up to
            ``step``; else empty sums (a new epoch, or a checkpoint without sums,
            whose epoch record then averages the steps after the resume only).
        """
        epoch, done = divmod(step, steps_per_epoch)
        saved = progress.get("epoch_metrics") or {}
        if done and saved.get("epoch") == epoch and saved.get("steps") == done:
            sums = {key: np.float32(saved[f"{key}_sum"]) for key in KEYS}
            return cls(epoch, done, sums)
        return cls(epoch)

    def add(self, metrics: Mapping[str, jax.Array]) -> None:
        """Adds one step's metrics (asynchronously, on device)."""
        step_values = {key: metrics[key] for key in KEYS}
        if self._sums is None:
            self._sums = step_values
        else:
            self._sums = {key: jnp.add(self._sums[key], step_values[key]) for key in KEYS}
        self.steps += 1

    def progress(self) -> dict[str, Any]:
        """The sums as JSON values for a checkpoint's ``progress`` (waits for them)."""
        saved: dict[str, Any] = {"epoch": self.epoch, "steps": self.steps}
        if self._sums is not None:
            values = jax.device_get(self._sums)
            saved.update({f"{key}_sum": float(np.float32(values[key])) for key in KEYS})
        return {"epoch_metrics": saved}

    def means(self) -> dict[str, float]:
        """``train_loss`` and ``train_accuracy``: the sums over the steps summed.

        Raises:
            ValueError: If no step was summed (the loop runs an epoch only
                when it has steps left to train).
        """
        if not self.steps:
            raise ValueError(f"no train step of epoch {self.epoch + 1} was summed: no means.")
        values = jax.device_get(self._sums)
        return {f"train_{key}": float(values[key]) / self.steps for key in KEYS}
