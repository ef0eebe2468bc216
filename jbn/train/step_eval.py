"""Test-set evaluations every N training steps, for accuracy-against-steps curves.

The loop evaluates after every epoch (``metrics.jsonl``, `jbn.train.run_log`);
``config.eval_every_steps = N`` also evaluates at step 0 and every N steps in
between, and keeps every evaluation of the run, epoch ends included, in
``workdir/evals.jsonl``: one record per evaluated step with ``step``,
``epoch`` (fractional), ``test_loss``, ``test_accuracy``, ``test_count`` and
``wall_time_s``. An epoch end is evaluated once, by the epoch record, and
copied here. On resume the file is cut back to the restored step, as
``metrics.jsonl`` is.

Example (what `jbn.train.loop` does)::

    evals = StepEvaluations(config.eval_every_steps, workdir, evaluate_fn,
                            steps_per_epoch=390, start_time=t0, start_step=0)
    evals.start(state)                                  # step 0
    for ...:
        evals.after_step(step, state, epoch_end=step == end)
    evals.add_epoch_record(record)                      # after each epoch
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from jbn.train import run_log

__all__ = ["EVALS_FILE", "StepEvaluations", "read"]

EVALS_FILE = "evals.jsonl"
_COPIED = ("test_loss", "test_accuracy", "test_count")


def read(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns the records of ``workdir/evals.jsonl`` (empty if none)."""
    return run_log.read(workdir, EVALS_FILE)


class StepEvaluations:
    """Evaluates the test set every ``every_steps`` steps and logs each evaluation.

    Every process must call the methods at the same steps (the evaluation is a
    collective computation); only the main process writes the file.

    Args:
        every_steps: Evaluate at step 0 and at every multiple of this; None
            turns the whole object into a no-op.
        workdir: The run directory (``evals.jsonl`` goes there).
        evaluate_fn: ``fn(state) -> dict(test_loss, test_accuracy, test_count)``.
        steps_per_epoch: For the ``epoch`` field.
        start_time: ``time.time()`` at the start of the run, for ``wall_time_s``.
        start_step: The step training starts (or resumes) from; later records
            are dropped from the file.
        is_main: Whether this process writes the file.

    Raises:
        ValueError: If ``every_steps`` is not None and below 1.
    """

    def __init__(
        self,
        every_steps: int | None,
        workdir: str | os.PathLike,
        evaluate_fn: Callable[[Any], Mapping[str, Any]],
        steps_per_epoch: int,
        start_time: float | None = None,
        *,
        start_step: int,
        is_main: bool = True,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ValueError(f"config.eval_every_steps={every_steps!r}: must be >= 1 or None.")
        self.every_steps = every_steps
        self.workdir = pathlib.Path(workdir)
        self._evaluate_fn = evaluate_fn
        self._steps_per_epoch = steps_per_epoch
        self._start_step = start_step
        self._start_time = time.time() if start_time is None else start_time
        self._is_main = is_main
        if self.enabled and is_main:
            # From scratch the step-0 record is written again, so drop it too.
            run_log.truncate_after(self.workdir, start_step if start_step else -1, EVALS_FILE)

    @property
    def enabled(self) -> bool:
        """Whether step-wise evaluation is on."""
        return self.every_steps is not None

    def start(self, state: Any) -> None:
        """Evaluates the initial state when training starts from step 0."""
        if self.enabled and self._start_step == 0:
            self._log(0, self._evaluate_fn(state))

    def after_step(self, step: int, state: Any, *, epoch_end: bool) -> None:
        """Evaluates after train step ``step`` if it is due and not an epoch end.

        Args:
            step: The number of steps done.
            state: The state after that step.
            epoch_end: The loop evaluates this step anyway (then `add_epoch_record`
                logs that evaluation instead).
        """
        if self.enabled and not epoch_end and step % self.every_steps == 0:
            self._log(step, self._evaluate_fn(state))

    def add_epoch_record(self, record: Mapping[str, Any]) -> None:
        """Logs the test metrics of an epoch record (see `jbn.train.run_log`)."""
        if self.enabled:
            self._log(int(record["step"]), record)

    def _log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._is_main:
            return
        entry: dict[str, Any] = {
            "step": step,
            "epoch": round(step / self._steps_per_epoch, 4),
            **{key: metrics[key] for key in _COPIED},
            "wall_time_s": time.time() - self._start_time,
        }
        run_log.append(self.workdir, entry, EVALS_FILE)
