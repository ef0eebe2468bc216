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
reports; `start` reports the step a resumed run starts from, before anything
else, so that a notice during start-up is placed after it. (A notice that
arrives before `start`, while the process is still starting, is missed: the
run goes on as without these handlers.) SIGINT is forwarded to the process as
SIGTERM, so Ctrl-C takes the same path.

Example:
    >>> with StopRequests() as stop:  # doctest: +SKIP
    ...     stop.start(step)
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
    (where Python cannot install handlers) it never requests a stop.

    Args:
        sync: For runs of several processes, ``fn(step) -> bool``: whether all
            processes have reached the step agreed on after a preemption
            notice (e.g. ``Checkpointer.reached_preemption``). None for one
            process.
    """

    def __init__(self, sync: Callable[[int], bool] | None = None) -> None:
        self._sync = sync
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        """The signal that asked to stop, as the user would name it."""
        if self._received is not None:
            return signal.Signals(self._received).name
        return "a preemption notice (SIGTERM to one of the processes)"

    @property
    def exit_code(self) -> int:
        """128 + the signal number (SIGTERM when another process received it)."""
        return 128 + (self._received or signal.SIGTERM)

    def start(self, step: int) -> None:
        """Reports the step training starts from (with ``sync``; a no-op without)."""
        if self._sync is not None:
            self._sync(step)

    def should_stop(self, step: int) -> bool:
        """Whether to stop now, after train step ``step``.

        With ``sync``, call it after every step on every process.
        """
        if self._sync is not None:
            return self._sync(step)
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
            # With several processes JAX's runtime owns SIGTERM; only SIGINT is ours.
            signals = (signal.SIGINT,) if self._sync is not None else STOP_SIGNALS
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
