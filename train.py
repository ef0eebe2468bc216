"""Trains SmallBNConvNet on CIFAR-10: flags -> jbn.train.loop.train_and_evaluate.

Usage::

    python train.py --workdir=./workdir                        # configs/default.py
    python train.py --config=configs/no_bn.py --workdir=./workdir_no_bn
    python train.py --config.optim.learning_rate=0.2 --config.num_epochs=20

Re-running the same command resumes from the latest checkpoint in --workdir.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JBN_COORDINATOR_ADDRESS/JBN_NUM_PROCESSES/JBN_PROCESS_ID) on every process.
"""

from __future__ import annotations

from collections.abc import Sequence

from jbn import cpu_tuning

# Must run before JAX is imported: the allocator and XLA read these at process start.
cpu_tuning.reexec_tuned()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jbn.train import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Directory for checkpoints and metrics.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Training configuration file.", lock_config=True
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")


def main(argv: Sequence[str]) -> None:
    """Runs training with the parsed flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    distributed.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    from jbn.train import loop  # Imported after the distributed runtime is up.

    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
