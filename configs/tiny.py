"""Tiny config for tests and CI: a few steps on a small CIFAR-format fixture.

Point ``data.data_dir`` at the fixture, e.g.
``python train.py --config configs/tiny.py --config.data.data_dir=/path/to/cifar``.
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (absl config_flags,
# tests, notebooks) without making configs/ an installed package.
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config shrunk to a few fast steps."""
    config = _DEFAULT["get_config"]()
    config.num_epochs = 2
    config.model.widths = (4, 8)
    config.data.download = False
    config.data.batch_size = 32
    config.data.eval_batch_size = 16
    config.data.prefetch = 1
    config.checkpoint_every_steps = 4
    config.keep_checkpoints = 2
    config.log_every_steps = 2
    return config
