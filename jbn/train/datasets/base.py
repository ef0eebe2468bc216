"""What every data set loader returns, and the errors and warnings they raise.

A loader reads a data set's official on-disk format into host NumPy arrays
(uint8 NHWC images, int32 labels) plus a `DatasetInfo` that tells the
training loop how to use them (classes, image shape, normalisation, whether
crop + flip augmentation suits the images).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "DataChecksumWarning",
    "DataFileError",
    "DataNotFoundError",
    "Dataset",
    "DatasetInfo",
]


class DatasetInfo(NamedTuple):
    """Static facts about a data set, known without reading it.

    Attributes:
        name: The ``config.data.name`` that selects it, e.g. ``"cifar10"``.
        title: How messages name it, e.g. ``"CIFAR-10"``.
        num_classes: Number of labels; ``config.model.num_classes`` must equal it.
        image_shape: ``(height, width, channels)`` of one image.
        num_train: Training images in the official release.
        mean: Per-channel mean of the official training set, in [0, 1] units.
        std: Per-channel standard deviation, in [0, 1] units.
        augmentable: Whether random crop + horizontal flip keeps an image's
            label (True for photos, False for digits, where a mirrored 2 is no 2).
    """

    name: str
    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentable: bool


class Dataset(NamedTuple):
    """A data set as host NumPy arrays: uint8 NHWC images and int32 labels.

    ``info`` defaults to CIFAR-10's for code that builds a ``Dataset`` by hand
    from the four arrays (the loaders always set it).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: DatasetInfo | None = None


class DataNotFoundError(FileNotFoundError):
    """The data set's files are missing and could not be downloaded."""


class DataFileError(ValueError):
    """A data file is malformed, unsafe to read, or (with strict checking) not the official one."""


class DataChecksumWarning(UserWarning):
    """Data files on disk differ from the official release (training goes on with them)."""
