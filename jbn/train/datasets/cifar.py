"""CIFAR-10 and CIFAR-100 in their official python-pickle layout.

CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``; each batch a pickled dict with
``b"data"`` (uint8 [n, 3072], channel-major rows) and ``b"labels"``.
CIFAR-100: ``cifar-100-python/`` with ``train``, ``test`` and ``meta``; the
batches hold ``b"fine_labels"`` (100 classes, the ones used here) and
``b"coarse_labels"`` (20 superclasses).

The pickles are read with `jbn.train.datasets.safe_pickle` (nothing in them is
executed) and checked against the per-file MD5 of the official archives
(`jbn.train.datasets.files.verify_checksums`).

Example:
    >>> ds = load_cifar10()  # $JBN_DATA_DIR or the user cache; downloads if needed
    >>> ds.train_images.shape, ds.info.num_classes  # doctest: +SKIP
    ((50000, 32, 32, 3), 10)
"""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import numpy as np

from jbn.train.datasets import files, safe_pickle
from jbn.train.datasets.base import DataFileError, DataNotFoundError, Dataset, DatasetInfo

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR10NotFoundError",
    "CifarRelease",
    "load_cifar",
    "load_cifar10",
    "load_cifar100",
    "resolve_data_dir",
]


class CIFAR10NotFoundError(DataNotFoundError):
    """The CIFAR-10 files are missing and could not be downloaded."""


class CifarRelease(NamedTuple):
    """Where an official CIFAR release lives and what it contains.

    ``md5`` holds the MD5 of every file of the official archive (as
    torchvision pins them); ``sha256`` is the archive's (as Keras pins it).
    """

    info: DatasetInfo
    dirname: str
    url: str
    sha256: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    md5: dict[str, str]
    not_found: type[DataNotFoundError]

    @property
    def files(self) -> tuple[str, ...]:
        """The batch files the loader needs."""
        return (*self.train_files, self.test_file)


CIFAR10 = CifarRelease(
    info=DatasetInfo(
        name="cifar10",
        title="CIFAR-10",
        num_classes=10,
        image_shape=(32, 32, 3),
        num_train=50_000,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augmentable=True,
    ),
    dirname="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    # 170,498,071 bytes; md5 c58f30108f718f92721af3b95e74349a.
    sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    not_found=CIFAR10NotFoundError,
)

CIFAR100 = CifarRelease(
    info=DatasetInfo(
        name="cifar100",
        title="CIFAR-100",
        num_classes=100,
        image_shape=(32, 32, 3),
        num_train=50_000,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augmentable=True,
    ),
    dirname="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    # 169,001,437 bytes; md5 eb9058c3a382ffc7106e4002c42a8d85.
    sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    md5={
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    not_found=DataNotFoundError,
)


def resolve_data_dir(
    data_dir: str | os.PathLike | None = None, release: CifarRelease = CIFAR10
) -> pathlib.Path:
    """Returns the directory that holds (or will hold) the release's batch files.

    The base is ``data_dir`` if given, else ``$JBN_DATA_DIR``, else the user
    cache (``pooch.os_cache("jbn")``). A base that already holds the test
    batch, or is named like the archive's folder (``cifar-10-batches-py``,
    ``cifar-100-python``), is returned as is; otherwise its subfolder of that name.
    """
    base = files.base_dir(data_dir)
    if base.name == release.dirname or (base / release.test_file).exists():
        return base
    return base / release.dirname


def _missing_files(directory: pathlib.Path, release: CifarRelease) -> list[str]:
    return [name for name in release.files if not (directory / name).is_file()]


def _not_found(directory: pathlib.Path, release: CifarRelease, reason: str) -> DataNotFoundError:
    title = release.info.title
    return release.not_found(
        f"{title} not found: {reason}\n"
        f"Missing files in {directory}: {', '.join(_missing_files(directory, release))}.\n"
        f"Download {release.url} and unpack it so that {directory} holds "
        f"{', '.join(release.files)}, or point {files.DATA_DIR_ENV} (or data_dir) at a "
        f"directory that holds {release.dirname}/."
    )


def _read_batch(path: pathlib.Path, release: CifarRelease) -> tuple[np.ndarray, np.ndarray]:
    """Reads one batch file as (uint8 NHWC images, int32 labels)."""
    entry = safe_pickle.load(path)
    if not isinstance(entry, dict) or b"data" not in entry or release.label_key not in entry:
        raise DataFileError(
            f"{path}: expected a dict with b'data' and {release.label_key!r} "
            f"({release.info.title} layout)."
        )
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[release.label_key])
    height, width, channels = release.info.image_shape
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != height * width * channels:
        raise DataFileError(
            f"{path}: expected uint8 data of shape [n, {height * width * channels}], "
            f"got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(f"{path}: {labels.shape} labels for {data.shape[0]} images.")
    if labels.size and (labels.min() < 0 or labels.max() >= release.info.num_classes):
        raise DataFileError(f"{path}: labels outside 0..{release.info.num_classes - 1}.")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each channel row-major.
    images = data.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar(
    release: CifarRelease,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    checksums: str = "warn",
    url: str | None = None,
    sha256: str | None = None,
) -> Dataset:
    """Loads a CIFAR release from its python-pickle layout, downloading it if needed.

    Args:
        release: `CIFAR10` or `CIFAR100`.
        data_dir: Where the data lives; see `resolve_data_dir` for the lookup order.
        download: Fetch the archive when files are missing.
        checksums: ``"warn"``, ``"strict"`` or ``"off"`` for files that differ
            from the official ones (see `jbn.train.datasets.files`).
        url: Archive location (default: the official one).
        sha256: Expected SHA-256 of the archive at ``url``.

    Returns:
        A `Dataset` of uint8 [N, 32, 32, 3] images and int32 [N] labels.

    Raises:
        DataNotFoundError: Files are missing and could not be downloaded or verified.
        DataFileError: A batch file is unsafe, malformed, or (strict) not official.
    """
    directory = resolve_data_dir(data_dir, release)
    if _missing_files(directory, release):
        if not download:
            raise _not_found(directory, release, "download=False.")
        files.download_archive(
            directory,
            url or release.url,
            sha256 or release.sha256,
            member_dir=release.dirname,
            required=release.files,
            not_found=lambda reason: _not_found(directory, release, reason),
        )
    files.verify_checksums(directory, release.md5, checksums, release.info.title)
    train = [_read_batch(directory / name, release) for name in release.train_files]
    test_images, test_labels = _read_batch(directory / release.test_file, release)
    return Dataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        info=release.info,
    )


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    checksums: str = "warn",
    url: str = CIFAR10.url,
    sha256: str = CIFAR10.sha256,
) -> Dataset:
    """Loads CIFAR-10 (10 classes); see `load_cifar` for the arguments."""
    return load_cifar(
        CIFAR10, data_dir, download=download, checksums=checksums, url=url, sha256=sha256
    )


def load_cifar100(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    checksums: str = "warn",
    url: str = CIFAR100.url,
    sha256: str = CIFAR100.sha256,
) -> Dataset:
    """Loads CIFAR-100 with its 100 fine labels; see `load_cifar` for the arguments."""
    return load_cifar(
        CIFAR100, data_dir, download=download, checksums=checksums, url=url, sha256=sha256
    )
