"""No-BatchNorm baseline: the same network with conv biases and no normalisation."""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (absl config_flags,
# tests, notebooks) without making configs/ an installed package.
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config without BatchNorm."""
    config = _DEFAULT["get_config"]()
    config.model.use_batch_norm = False
    # Without BN the seed network diverges at a peak LR of 0.1.
    config.optim.learning_rate = 0.02
    return config
