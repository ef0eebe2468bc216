"""CIFAR-100: the default SmallBNConvNet recipe on the 100 fine classes.

Run with ``python train.py --config configs/cifar100.py --workdir ./workdir_c100``
(the official archive is downloaded and checksummed if ``data.data_dir`` does not
hold ``cifar-100-python/``).
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config switched to CIFAR-100."""
    config = _DEFAULT["get_config"]()
    config.data.name = "cifar100"
    config.model.num_classes = 100
    return config
