"""Graceful stop on SIGTERM and SIGINT: finish the step, checkpoint it, exit with a known code.

Schedulers announce preemption with SIGTERM (SLURM, Kubernetes, spot
machines) and users stop runs with Ctrl-C (SIGINT). Inside `StopRequests`,
neither ends the process: the loop asks `StopRequests.should_stop` after every
train step, and when it says yes the loop saves a checkpoint of that step and
raises `Preempted`, whose ``exit_code`` is 128 + the signal number (143 for
SIGTERM, 130 for SIGINT), what a shell reports for a process killed by that
signal. Re-running the same command resumes from that checkpoint. A second
signal stops at once, as without the handlers.

Single process: Python handlers record the signal.

Several processes: all must stop after the same step, or the others would
wait forever in the next collective. JAX's distributed runtime catches
SIGTERM on any process (its preemption notifier) and agrees with the others
on a step to stop at: the fastest process's last step + 1
(``multihost_utils.reached_preemption_sync_point``, which orbax's
``CheckpointManager.reached_preemption`` wraps). `should_stop` asks it after
every step with the global train step, the counter orbax's own ``save`` also
reports; `report_start_step` reports the step a resumed run starts from,
before anything else, so that a notice during start-up is placed after it.
(A notice that arrives before that, while the process is still starting, is
missed: the run goes on as without these handlers.) SIGINT is forwarded to
the process as SIGTERM, so Ctrl-C takes the same path.

Several processes without that service (``jax_enable_preemption_service``
False: JAX then installs no SIGTERM handler, so a SIGTERM would kill the
process with nothing saved): Python handlers record SIGTERM and SIGINT as in a
single process, and after every step all processes share their flags
(``agree``, e.g. `jbn.train.distributed.any_process`, a small all-gather), so
they all stop after the first step at whose end any of them had a signal.

Example:
    >>> with StopRequests() as stop:  # doctest: +SKIP
    ...     stop.report_start_step(step)
    ...     for batch in batches:
    ...         state, step = train_step(state, batch), step + 1
    ...         if stop.should_stop(step):
    ...             checkpointer.save(step, state)
    ...             raise Preempted(step, stop.signal_name, directory, stop.exit_code)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Preempted", "StopRequests"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped after a step on a signal; that step is checkpointed.

    Attributes:
        step: The last step trained and checkpointed.
        signal_name: ``"SIGTERM"``, ``"SIGINT"``, or a description when another
            process received it.
        checkpoint_dir: Where the checkpoint is.
        exit_code: 128 + the signal number: 143 (SIGTERM) or 130 (SIGINT).
    """

    def __init__(self, step: int, signal_name: str, checkpoint_dir: str, exit_code: int) -> None:
        self.step = step
        self.signal_name = signal_name
        self.checkpoint_dir = checkpoint_dir
        self.exit_code = exit_code
        super().__init__(
            f"Stopped by {signal_name} after train step {step}; its checkpoint is in "
            f"{checkpoint_dir}. Run the same command again to resume from step {step}."
        )


class StopRequests:
    """Turns SIGTERM/SIGINT into a request to stop after the current step.

    Use as a context manager around the train loop; handlers are installed on
    entry and the previous ones restored on exit. Outside the main thread
    (where Python cannot install handlers) no signal is seen. A run of one
    process passes neither ``sync`` nor ``agree``; one of several passes one.

    Args:
        sync: For runs of several processes with JAX's preemption service,
            ``fn(step) -> bool``: whether all processes have reached the step
            agreed on after a preemption notice (e.g.
            ``Checkpointer.reached_preemption``). JAX then owns SIGTERM.
        agree: For runs of several processes without it, ``fn(flag) -> bool``:
            whether any process's ``flag`` (a signal received) is True, a
            collective (e.g. `jbn.train.distributed.any_process`).

    Raises:
        ValueError: If both ``sync`` and ``agree`` are given.
    """

    def __init__(
        self,
        sync: Callable[[int], bool] | None = None,
        *,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        if sync is not None and agree is not None:
            raise ValueError("StopRequests takes sync (JAX's preemption sync) or agree, not both.")
        self._sync = sync
        self._agree = agree
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        """The signal that asked to stop, as the user would name it."""
        if self._received is not None:
            return signal.Signals(self._received).name
        if self._agree is not None:
            return "a stop request (SIGTERM or SIGINT to another process)"
        return "a preemption notice (SIGTERM to one of the processes)"

    @property
    def exit_code(self) -> int:
        """128 + the signal number (SIGTERM when another process received it)."""
        return 128 + (self._received or signal.SIGTERM)

    def report_start_step(self, step: int) -> None:
        """Reports the step training starts from to JAX's preemption sync (else a no-op).

        Call it first, on every process: a preemption notice from then on is
        placed after ``step``.
        """
        if self._sync is not None:
            self._sync(step)

    def should_stop(self, step: int) -> bool:
        """Whether to stop now, after train step ``step``.

        With ``sync`` or ``agree``, call it after every step on every process.
        """
        if self._sync is not None:
            return self._sync(step)
        if self._agree is not None:
            return self._agree(self._received is not None)
        return self._received is not None

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python (JAX's own SIGTERM notifier).
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._received = signum
        self._restore()  # A second signal acts as if we were not here.
        name = signal.Signals(signum).name
        message = (
            f"\nReceived {name}: stopping after the current train step and saving a "
            f"checkpoint (send {name} again to stop at once).\n"
        )
        try:  # A raw write: the handler may interrupt a write to sys.stderr.
            os.write(2, message.encode())
        except OSError:
            pass
        if self._sync is not None:
            # JAX's distributed runtime listens for SIGTERM only: forward Ctrl-C to it.
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            # With JAX's preemption sync its runtime owns SIGTERM; only SIGINT is ours.
            signals = (signal.SIGINT,) if self._sync is not None else STOP_SIGNALS
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
