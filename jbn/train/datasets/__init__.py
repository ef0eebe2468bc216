"""Data sets the workbench trains on, by ``config.data.name``, read from their official formats.

| name | files | images | classes |
|---|---|---|---|
| ``cifar10`` (default) | ``cifar-10-batches-py/`` pickles | 32x32x3 | 10 |
| ``cifar100`` | ``cifar-100-python/`` pickles (fine labels) | 32x32x3 | 100 |
| ``mnist`` | the four IDX files, plain or ``.gz`` | 28x28x1 | 10 |

Every loader reads untrusted files safely (`safe_pickle`), checks them against
the official checksums (`files.verify_checksums`) and can download the
official release (`files`). Importing this package does not import JAX.

Example:
    >>> info("cifar100").num_classes
    100
    >>> ds = load("cifar10", "/data", download=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jbn.train.datasets.base import (
    DataChecksumWarning,
    DataFileError,
    DataNotFoundError,
    Dataset,
    DatasetInfo,
)
from jbn.train.datasets.cifar import (
    CIFAR10,
    CIFAR100,
    CIFAR10NotFoundError,
    load_cifar10,
    load_cifar100,
)
from jbn.train.datasets.files import CHECKSUM_MODES
from jbn.train.datasets.mnist import MNIST, load_mnist
from jbn.train.datasets.safe_pickle import UnsafePickleError

__all__ = [
    "CHECKSUM_MODES",
    "CIFAR10NotFoundError",
    "DataChecksumWarning",
    "DataFileError",
    "DataNotFoundError",
    "Dataset",
    "DatasetInfo",
    "UnsafePickleError",
    "info",
    "load",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "names",
]

_CATALOG: dict[str, tuple[DatasetInfo, Callable[..., Dataset]]] = {
    "cifar10": (CIFAR10.info, load_cifar10),
    "cifar100": (CIFAR100.info, load_cifar100),
    "mnist": (MNIST, load_mnist),
}


def names() -> tuple[str, ...]:
    """The names ``config.data.name`` accepts."""
    return tuple(_CATALOG)


def info(name: str) -> DatasetInfo:
    """Static facts about data set ``name`` (classes, image shape, normalisation).

    Raises:
        KeyError: For an unknown name.
    """
    if name not in _CATALOG:
        raise KeyError(f"Unknown data set {name!r}; known: {', '.join(_CATALOG)}.")
    return _CATALOG[name][0]


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    checksums: str = "warn",
) -> Dataset:
    """Loads data set ``name`` (see the table above) from ``data_dir``.

    Args:
        name: One of `names`.
        data_dir: Where the files are (default: ``$JBN_DATA_DIR`` or the user cache).
        download: Fetch the official release when files are missing.
        checksums: ``"warn"``, ``"strict"`` or ``"off"`` for files that differ
            from the official release.

    Returns:
        The `Dataset`, with its `DatasetInfo` in ``info``.
    """
    info(name)  # Raises KeyError for an unknown name.
    return _CATALOG[name][1](data_dir, download=download, checksums=checksums)
