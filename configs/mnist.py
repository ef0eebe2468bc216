"""MNIST: SmallBNConvNet on 28x28 grey digits, without augmentation.

Point ``data.data_dir`` at a directory with the four IDX files (plain or
``.gz``), e.g. ``python train.py --config configs/mnist.py
--config.data.data_dir=/data/mnist --workdir ./workdir_mnist``; without one, the
files are downloaded from the official mirrors and checksummed.
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config switched to MNIST."""
    config = _DEFAULT["get_config"]()
    config.data.name = "mnist"
    config.model.num_classes = 10
    # Random crop + horizontal flip does not keep a digit's label (a mirrored 2
    # is no 2); the config schema refuses augment=True for MNIST.
    config.data.augment = False
    config.num_epochs = 5
    return config
