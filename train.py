"""Trains a model of the zoo on CIFAR-10, CIFAR-100 or MNIST: flags -> jbn.train.loop.train_and_evaluate.

The config (``configs/default.py``: SmallBNConvNet on CIFAR-10) picks the
model (``config.model.name``, any of ``jbn.models.model_names()``: the
SmallBNConvNet, the MLP, the ResNets and plain nets) and the data set
(``config.data.name``: ``cifar10``, ``cifar100``, ``mnist``).

Usage::

    python train.py --workdir=./workdir                        # configs/default.py
    python train.py --config=configs/no_bn.py --workdir=./workdir_no_bn
    python train.py --config=configs/resnet20.py --config.model.name=resnet56 --workdir=./wd
    python train.py --config.optim.learning_rate=0.2 --config.num_epochs=20

Re-running the same command resumes from the latest checkpoint in --workdir.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JBN_COORDINATOR_ADDRESS/JBN_NUM_PROCESSES/JBN_PROCESS_ID) on every process.

Exit codes: 0 when training finished; 2 for a bad config value or a resume
with a config that does not fit the workdir's checkpoints (one line per
problem on stderr, no traceback); 3 for missing or bad data files (one
message, no traceback); 143 (SIGTERM) or 130 (SIGINT, Ctrl-C) when a signal
stopped the run after checkpointing its last step (re-run the same command to
resume); 1 is Python's own code for an uncaught exception (a traceback: a bug
or an error nothing above covers).
"""

from __future__ import annotations

import pathlib
import shlex
import sys
import warnings
from collections.abc import Sequence

from jbn import cpu_tuning

# Must run before JAX is imported: the allocator and XLA read these at process start.
cpu_tuning.reexec_tuned()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jbn.train import config_schema, datasets, distributed  # noqa: E402
from jbn.train.checkpoint import CheckpointMismatchError  # noqa: E402

# The default config next to this file, so the script runs from any working directory.
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "default.py"
EXIT_CONFIG_ERROR = 2
EXIT_DATA_ERROR = 3  # Not 1: Python exits with 1 on any uncaught exception.

_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Directory for checkpoints and metrics.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "Training configuration file.", lock_config=True
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """Warnings as one line with their category (no source location: they are for the user)."""
    del filename, lineno, line
    return f"Warning ({category.__name__}): {message}\n"


def _exit(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: Sequence[str]) -> None:
    """Runs training with the parsed flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    warnings.formatwarning = _one_line_warning
    try:
        config_schema.validate(_CONFIG.value)  # Before anything starts.
    except config_schema.ConfigError as e:
        _exit(str(e), EXIT_CONFIG_ERROR)
    distributed.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    from jbn.train import loop, preemption  # Imported after the distributed runtime is up.

    try:
        loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (config_schema.ConfigError, CheckpointMismatchError) as e:
        _exit(str(e), EXIT_CONFIG_ERROR)
    except (datasets.DataNotFoundError, datasets.DataFileError) as e:
        _exit(str(e), EXIT_DATA_ERROR)
    except preemption.Preempted as e:
        _exit(f"{e}\nResume with: {shlex.join([sys.executable, *sys.argv])}", e.exit_code)


if __name__ == "__main__":
    app.run(main)
