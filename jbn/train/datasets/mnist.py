"""MNIST from its standard IDX files, plain or gzipped.

The four files of the official release, in one directory:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally
with ``.gz``. An IDX file is a big-endian header (two zero bytes, a type code,
0x08 for unsigned bytes, the number of dimensions, then one uint32 per
dimension) followed by the raw values. Images are 28x28 grey digits, loaded as
uint8 [N, 28, 28, 1].

Digits are not mirror-symmetric, so `MNIST.augmentable` is False and a config
for MNIST sets ``data.augment=False`` (``configs/mnist.py``).

The ``.gz`` files are checked against the official MD5s (as torchvision pins
them); no official checksum exists for unpacked files, so those are not
hashed. A download fetches the ``.gz`` files from the mirrors in `MIRRORS`.

Example:
    >>> ds = load_mnist("/data/mnist")  # doctest: +SKIP
    >>> ds.train_images.shape  # doctest: +SKIP
    (60000, 28, 28, 1)
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zlib

import numpy as np

from jbn.train.datasets import files
from jbn.train.datasets.base import DataFileError, DataNotFoundError, Dataset, DatasetInfo

__all__ = ["FILES", "MIRRORS", "MNIST", "load_mnist", "read_idx", "resolve_data_dir"]

MNIST = DatasetInfo(
    name="mnist",
    title="MNIST",
    num_classes=10,
    image_shape=(28, 28, 1),
    num_train=60_000,
    mean=(0.1307,),
    std=(0.3081,),
    augmentable=False,
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MD5_GZ = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
SUBDIR = "mnist"
_UNSIGNED_BYTE = 0x08
# Deflate's largest expansion (about 1032:1): a .gz header cannot honestly claim more.
MAX_DEFLATE_RATIO = 1032


def _find(directory: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(directory: pathlib.Path) -> list[str]:
    return [name for name in FILES.values() if _find(directory, name) is None]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the directory that holds (or will hold) the four IDX files.

    The base is ``data_dir``, ``$JBN_DATA_DIR`` or the user cache, as for
    CIFAR. The first of ``base``, ``base/mnist`` and ``base/MNIST/raw``
    (torchvision's layout) that holds the files is returned; if none does,
    ``base/mnist`` (where a download goes).
    """
    base = files.base_dir(data_dir)
    for directory in (base, base / SUBDIR, base / "MNIST" / "raw"):
        if not _missing_files(directory):
            return directory
    return base / SUBDIR


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (plain or ``.gz``) into a uint8 array.

    The size the header claims is checked against the file before the values
    are read: a plain file must hold exactly that many bytes after the header,
    and a ``.gz`` file can hold at most `MAX_DEFLATE_RATIO` times its size; no
    more than the claimed values plus one byte are ever inflated.

    Raises:
        DataFileError: If the header is not an unsigned-byte IDX header, the
            values do not match it, or a ``.gz`` file is corrupt.
    """
    path = pathlib.Path(path)
    gzipped = path.suffix == ".gz"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] or head[1] or head[2] != _UNSIGNED_BYTE:
                raise DataFileError(f"{path}: not an IDX file of unsigned bytes (header {head!r}).")
            dims = f.read(4 * head[3])
            shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))
            if len(dims) != 4 * head[3]:
                raise DataFileError(
                    f"{path}: the header ends after {len(shape)} of {head[3]} sizes."
                )
            size = math.prod(shape)  # Exact: np.prod wraps around in int64.
            header = 4 + len(dims)
            on_disk = path.stat().st_size
            if gzipped and size > MAX_DEFLATE_RATIO * on_disk:
                raise DataFileError(
                    f"{path}: the header says shape {shape} ({size} values), more than a "
                    f".gz file of {on_disk} bytes can hold."
                )
            if not gzipped and size != on_disk - header:
                raise DataFileError(
                    f"{path}: the header says shape {shape} ({size} values), but "
                    f"{on_disk - header} values follow."
                )
            raw = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # A corrupt gzip stream.
        raise DataFileError(f"{path}: unreadable ({e}).") from None
    if len(raw) != size:
        follow = "more" if len(raw) > size else str(len(raw))
        raise DataFileError(
            f"{path}: the header says shape {shape} ({size} values), but {follow} values follow."
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def _read_split(directory: pathlib.Path, images_name: str, labels_name: str) -> tuple:
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != MNIST.image_shape[:2]:
        raise DataFileError(f"{images_path}: expected images [n, 28, 28], got {images.shape}.")
    if labels.shape != (images.shape[0],):
        raise DataFileError(
            f"{labels_path}: {labels.shape} labels for the {images.shape[0]} images of "
            f"{images_path.name}."
        )
    if labels.size and labels.max() >= MNIST.num_classes:
        raise DataFileError(f"{labels_path}: labels outside 0..{MNIST.num_classes - 1}.")
    return images[..., None], labels.astype(np.int32)


def _not_found(directory: pathlib.Path, reason: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"MNIST not found: {reason}\n"
        f"Missing files in {directory}: {', '.join(_missing_files(directory))} (plain or .gz).\n"
        f"Put the four IDX files of the MNIST release ({', '.join(MD5_GZ)}) there, or point "
        f"config.data.data_dir (or {files.DATA_DIR_ENV}) at the directory that holds them."
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    checksums: str = "warn",
    mirrors: tuple[str, ...] = MIRRORS,
) -> Dataset:
    """Loads MNIST from a directory of IDX files, downloading them if needed.

    Args:
        data_dir: Where the files are; see `resolve_data_dir`.
        download: Fetch the ``.gz`` files from ``mirrors`` when files are missing.
        checksums: ``"warn"``, ``"strict"`` or ``"off"`` for ``.gz`` files that
            differ from the official ones.
        mirrors: Base URLs tried in order.

    Returns:
        A `Dataset` of uint8 [N, 28, 28, 1] images and int32 [N] labels.

    Raises:
        DataNotFoundError: Files are missing and could not be downloaded.
        DataFileError: A file is malformed or (strict) not the official one.
    """
    directory = resolve_data_dir(data_dir)
    if _missing_files(directory):
        if not download:
            raise _not_found(directory, "download=False.")
        files.download_files(
            directory, mirrors, MD5_GZ, not_found=lambda reason: _not_found(directory, reason)
        )
    files.verify_checksums(directory, MD5_GZ, checksums, MNIST.title)
    train_images, train_labels = _read_split(
        directory, FILES["train_images"], FILES["train_labels"]
    )
    test_images, test_labels = _read_split(directory, FILES["test_images"], FILES["test_labels"])
    return Dataset(train_images, train_labels, test_images, test_labels, info=MNIST)
