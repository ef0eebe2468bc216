"""CIFAR-10 input pipeline: loading, download, host batching and on-device augmentation.

The host side works on numpy arrays (uint8 NHWC images, int32 labels) and yields
per-process batches; the device side (`preprocess`, `augment`) is pure JAX so it
can live inside a jitted train step.

Example:
    >>> ds = load_cifar10()  # $JBN_DATA_DIR or the user cache; downloads if needed
    >>> batches = train_batches(ds.train_images, ds.train_labels, 128, seed=0, epoch=0)
    >>> for batch in prefetch(batches):
    ...     images = preprocess(augment(rng, batch["image"]))
"""

from __future__ import annotations

import os
import pathlib
import pickle
import queue
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pooch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# SHA-256 of the official archive (170,498,071 bytes; md5 c58f30108f718f92721af3b95e74349a),
# as pinned by keras.datasets.cifar10.
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
DATA_DIR_ENV = "JBN_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 10.0

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# Per-channel statistics of the official CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

Batch = dict[str, np.ndarray]


class Dataset(NamedTuple):
    """CIFAR-10 as host numpy arrays (uint8 NHWC images, int32 labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class CIFAR10NotFoundError(FileNotFoundError):
    """The CIFAR-10 files are missing and could not be downloaded."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory that holds (or will hold) `data_batch_1..5` and `test_batch`.

    The base is `data_dir` if given, else `$JBN_DATA_DIR`, else the user cache
    (`pooch.os_cache("jbn")`). A base that already holds the batch files, or is
    named `cifar-10-batches-py`, is returned as is; otherwise its
    `cifar-10-batches-py` subdirectory is returned (the archive's own layout).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or pooch.os_cache("jbn")
    base = pathlib.Path(data_dir).expanduser()
    if base.name == CIFAR10_DIRNAME or (base / TEST_FILE).exists():
        return base
    return base / CIFAR10_DIRNAME


def _missing_files(directory: pathlib.Path) -> list[str]:
    return [name for name in (*TRAIN_FILES, TEST_FILE) if not (directory / name).is_file()]


def _not_found_message(directory: pathlib.Path, reason: str) -> str:
    missing = ", ".join(_missing_files(directory))
    return (
        f"CIFAR-10 not found: {reason}\n"
        f"Missing files in {directory}: {missing}.\n"
        f"Download {CIFAR10_URL} and unpack it so that {directory} holds "
        f"data_batch_1..data_batch_5 and test_batch, or point {DATA_DIR_ENV} (or data_dir) "
        f"at a directory that holds {CIFAR10_DIRNAME}/."
    )


def _download_and_unpack(directory: pathlib.Path, url: str, sha256: str) -> None:
    """Fetch the archive, check its hash and move the batch files into `directory`.

    Everything happens in a temporary sibling directory, so a failed download,
    a wrong checksum or a broken archive leaves `directory` untouched.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".jbn-cifar10-", dir=directory.parent))
    try:
        try:
            archive = pooch.retrieve(
                url,
                known_hash=f"sha256:{sha256}",
                fname="cifar-10-python.tar.gz",
                path=staging,
                downloader=pooch.HTTPDownloader(timeout=DOWNLOAD_TIMEOUT_S),
            )
        except ValueError as e:  # pooch's hash mismatch
            raise CIFAR10NotFoundError(
                _not_found_message(directory, f"checksum mismatch for {url}: {e}")
            ) from e
        except Exception as e:  # requests' connection / timeout / HTTP errors
            raise CIFAR10NotFoundError(
                _not_found_message(directory, f"download from {url} failed ({e!r}).")
            ) from e
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging / "unpacked", filter="data")
        unpacked = staging / "unpacked" / CIFAR10_DIRNAME
        if _missing_files(unpacked):
            raise CIFAR10NotFoundError(
                _not_found_message(directory, f"archive from {url} lacks {CIFAR10_DIRNAME}/.")
            )
        if not directory.exists():
            unpacked.rename(directory)  # atomic on one filesystem
        else:
            for path in unpacked.iterdir():
                if not (directory / path.name).exists():
                    path.rename(directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official pickle batch as (uint8 NHWC images, int32 labels)."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
        raise ValueError(f"{path}: expected data of shape [n, 3072], got {data.shape}.")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images.")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels outside 0..{NUM_CLASSES - 1}.")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each channel row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str = CIFAR10_URL,
    sha256: str = CIFAR10_SHA256,
) -> Dataset:
    """Load CIFAR-10 from the official python-pickle layout, downloading it if needed.

    Args:
      data_dir: where the data lives; see `resolve_data_dir` for the lookup order.
      download: fetch the archive from `url` when files are missing.
      url: archive location (the official `cifar-10-python.tar.gz` by default).
      sha256: expected SHA-256 hex digest of the archive.

    Returns:
      A `Dataset` of uint8 [N, 32, 32, 3] images and int32 [N] labels.

    Raises:
      CIFAR10NotFoundError: files are missing and could not be downloaded or verified.
      ValueError: a batch file has unexpected shapes or labels.
    """
    directory = resolve_data_dir(data_dir)
    if _missing_files(directory):
        if not download:
            raise CIFAR10NotFoundError(_not_found_message(directory, "download=False."))
        _download_and_unpack(directory, url, sha256)
    train = [_read_batch(directory / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(directory / TEST_FILE)
    return Dataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
    )


def num_train_steps(num_examples: int, batch_size: int) -> int:
    """Return the number of steps in one training epoch (the remainder is dropped)."""
    return num_examples // batch_size


def num_eval_steps(num_examples: int, batch_size: int) -> int:
    """Return the number of steps that see every example once (last batch padded)."""
    return -(-num_examples // batch_size)


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """Return the slice of a global batch that belongs to `process_index`."""
    if batch_size % process_count:
        raise ValueError(
            f"Global batch_size={batch_size} is not divisible by process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yield one shuffled epoch of this process's share of each global batch.

    The permutation depends only on (seed, epoch), so every process draws the
    same global batches and takes a disjoint `batch_size // process_count` rows.
    The last incomplete global batch is dropped.

    Yields:
      dict(image=uint8 [b, 32, 32, 3], label=int32 [b]) with b = batch_size // process_count.
    """
    rows = _local_rows(batch_size, process_index, process_count)
    order = np.random.default_rng((seed, epoch)).permutation(len(images))
    for step in range(num_train_steps(len(images), batch_size)):
        indices = order[step * batch_size : (step + 1) * batch_size][rows]
        yield {"image": images[indices], "label": labels[indices].astype(np.int32)}


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yield every example exactly once, in order, padding the last global batch.

    Padding rows are zero images with label 0 and `mask=False`; every process
    yields the same number of batches (some may be all padding).

    Yields:
      dict(image=uint8 [b, ...], label=int32 [b], mask=bool [b]), b = batch_size // process_count.
    """
    rows = _local_rows(batch_size, process_index, process_count)
    num_examples = len(images)
    for step in range(num_eval_steps(num_examples, batch_size)):
        positions = np.arange(step * batch_size, (step + 1) * batch_size)[rows]
        mask = positions < num_examples
        indices = np.where(mask, positions, 0)
        batch_images = images[indices]
        batch_images[~mask] = 0
        batch_labels = np.where(mask, labels[indices], 0).astype(np.int32)
        yield {"image": batch_images, "label": batch_labels, "mask": mask}


class _SourceFailed(NamedTuple):
    error: BaseException


_END = object()


def prefetch(
    iterator: Iterator[Any], size: int = 2, put: Callable[[Any], Any] = jax.device_put
) -> Iterator[Any]:
    """Run `put(item)` for the next `size` items on a background thread.

    Args:
      iterator: the host batches.
      size: how many transferred batches to keep ready.
      put: host-to-device transfer, e.g.
        `lambda b: jax.make_array_from_process_local_data(sharding, b)`.

    Yields:
      `put(item)` for each item, in order. An exception raised by `iterator` or
      `put` is re-raised here; closing the generator early stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not offer(put(item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer(_SourceFailed(e))
            return
        offer(_END)

    thread = threading.Thread(target=produce, name="jbn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _SourceFailed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """Map uint8 images to float32, scaled to [0, 1] and normalised per channel."""
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CIFAR10_MEAN, jnp.float32)) / jnp.asarray(CIFAR10_STD, jnp.float32)


def sample_crop_flip(rng: jax.Array, num_images: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """Draw what `augment` uses: int32 [n, 2] crop offsets in [0, 2*pad] and bool [n] flips."""
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (num_images, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_rng, 0.5, (num_images,))
    return offsets, flips


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int) -> jax.Array:
    """Zero-pad NHWC `images` by `pad`, crop at `offsets` (row, col), mirror where `flips`."""
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    zero = jnp.zeros((), offsets.dtype)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        start = (offset[0], offset[1], zero)
        return jax.lax.dynamic_slice(image, start, (height, width, channels))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def augment(rng: jax.Array, images: jax.Array, *, pad: int = 4) -> jax.Array:
    """Random crop with zero padding plus random horizontal flip, independently per image.

    Matches torchvision's `RandomCrop(32, padding=4)` (zero padding) followed by
    `RandomHorizontalFlip()`. Pure and jit-able; works on uint8 or float NHWC batches
    and returns the same shape and dtype.
    """
    offsets, flips = sample_crop_flip(rng, images.shape[0], pad)
    return crop_and_flip(images, offsets, flips, pad)
