"""TensorBoard event files of a run's per-epoch scalars, next to ``metrics.jsonl``.

Each epoch record of `jbn.train.run_log` is also written as TensorBoard
scalars (train/test loss and accuracy, learning rate, images/s) at the
record's train step, in the run's workdir, so ``tensorboard --logdir runs/``
shows every run under ``runs/`` (a sweep's variants) side by side. Only
process 0 writes.

``config.log.tensorboard`` chooses: ``True`` writes (and fails at the start of
the run, naming the extra, when ``tensorboardX`` is missing), ``False`` does
not, ``None`` (the default) writes when ``tensorboardX`` is installed
(``pip install -e ".[tensorboard]"``) and otherwise says so in one line and
trains on: the base install needs nothing more, and asking for it explicitly
never passes silently.

A resumed run hides the events after its restored step (``purge_step``), as
``metrics.jsonl`` drops their records, so TensorBoard shows one value per step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["TAGS", "ScalarWriter", "open_writer", "wanted"]

# Record key (jbn.train.run_log) -> TensorBoard tag. Tags sharing a prefix
# share a section of TensorBoard's scalars dashboard.
TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_accuracy": "accuracy/train",
    "test_accuracy": "accuracy/test",
    "lr": "learning_rate",
    "images_per_sec": "images_per_sec",
    "epoch": "epoch",
}
INSTALL_HINT = 'pip install -e ".[tensorboard]"'


def installed() -> bool:
    """Whether ``tensorboardX`` (the ``tensorboard`` extra) can be imported."""
    return importlib.util.find_spec("tensorboardX") is not None


def wanted(setting: bool | None) -> bool:
    """Whether to write event files for ``config.log.tensorboard = setting``.

    `jbn.train.config_schema.validate` refuses True without ``tensorboardX``
    before a run starts; this check is for direct callers.

    Raises:
      ImportError: If ``setting`` is True and ``tensorboardX`` is not installed.
    """
    if setting is None:
        return installed()
    if setting and not installed():
        raise ImportError(
            f"config.log.tensorboard=True needs tensorboardX: {INSTALL_HINT} "
            "(or set --config.log.tensorboard=False)"
        )
    return bool(setting)


class ScalarWriter:
    """Writes epoch records as TensorBoard scalars; does nothing when disabled.

    Args:
      workdir: The run's directory; the event file goes there.
      start_step: The step the run starts (or resumes) from; events of later
        steps from an earlier, interrupted run are hidden.
      enabled: Write at all (False: every method is a no-op).
    """

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, enabled: bool):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter  # Optional extra, imported when used.

            # The event file is created at the first write. Its name holds the time
            # in seconds and the host; the pid keeps two writers' files apart.
            self._writer = SummaryWriter(
                logdir=os.fspath(workdir),
                purge_step=start_step + 1,
                filename_suffix=f".{os.getpid()}",
            )

    @property
    def enabled(self) -> bool:
        """True when this writer writes event files."""
        return self._writer is not None

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes the scalars of one epoch record at ``record["step"]`` and flushes."""
        if self._writer is None:
            return
        for key, tag in TAGS.items():
            if key in record:
                self._writer.add_scalar(tag, float(record[key]), global_step=int(record["step"]))
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_writer(
    workdir: str | os.PathLike, log_config: Any, *, start_step: int, is_main: bool
) -> ScalarWriter:
    """The run's `ScalarWriter`, enabled on process 0 when ``log_config.tensorboard`` asks.

    Args:
      workdir: The run's directory.
      log_config: ``config.log`` (``None`` or without ``tensorboard``: the default).
      start_step: The step the run starts or resumes from.
      is_main: Whether this is process 0 (it alone writes and prints).

    Raises:
      ImportError: If TensorBoard is asked for and ``tensorboardX`` is missing.
    """
    setting = None if log_config is None else log_config.get("tensorboard")
    enabled = wanted(setting)
    if is_main and setting is None and not enabled:
        print(f"TensorBoard logging off: tensorboardX is not installed ({INSTALL_HINT}).")
    return ScalarWriter(workdir, start_step=start_step, enabled=enabled and is_main)
