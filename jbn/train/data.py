"""Input pipeline: host batching, prefetching and on-device preprocessing and augmentation.

The data sets themselves are read by `jbn.train.datasets` (``load_cifar10``
and ``resolve_data_dir`` are re-exported here). The host side works on numpy
arrays (uint8 NHWC images, int32 labels) and yields per-process batches; the
device side (`preprocess`, `augment`) is pure JAX so it can live inside a
jitted train step.

Example:
    >>> ds = load_cifar10()  # $JBN_DATA_DIR or the user cache; downloads if needed
    >>> batches = train_batches(ds.train_images, ds.train_labels, 128, seed=0, epoch=0)
    >>> for batch in prefetch(batches):
    ...     images = preprocess(augment(rng, batch["image"]), ds.info)
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbn.train import distributed
from jbn.train.datasets import (
    CIFAR10NotFoundError,
    Dataset,
    DatasetInfo,
    load_cifar10,
)
from jbn.train.datasets.cifar import CIFAR10, resolve_data_dir

__all__ = [
    "CIFAR10NotFoundError",
    "Dataset",
    "DatasetInfo",
    "augment",
    "crop_and_flip",
    "device_batches",
    "eval_batches",
    "load_cifar10",
    "num_eval_steps",
    "num_train_steps",
    "prefetch",
    "preprocess",
    "resolve_data_dir",
    "sample_crop_flip",
    "take_examples",
    "train_batches",
]

# CIFAR-10's facts, kept here for code written before the other data sets.
NUM_CLASSES = CIFAR10.info.num_classes
IMAGE_SHAPE = CIFAR10.info.image_shape
CIFAR10_MEAN = CIFAR10.info.mean
CIFAR10_STD = CIFAR10.info.std

Batch = dict[str, np.ndarray]


def take_examples(dataset: Dataset, data_config: Any) -> Dataset:
    """Keeps the first ``config.data.num_train_examples`` / ``num_test_examples`` of each split.

    Args:
      dataset: The data set.
      data_config: ``config.data``; an absent or None count keeps the whole split.

    Returns:
      The same data set, cut down (``info`` unchanged).

    Raises:
      ValueError: if a count is not an integer in [1, the examples of that split].
    """
    kept = {}
    for split in ("train", "test"):
        num = data_config.get(f"num_{split}_examples")
        if num is None:
            continue
        images, labels = getattr(dataset, f"{split}_images"), getattr(dataset, f"{split}_labels")
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= len(images):
            raise ValueError(
                f"config.data.num_{split}_examples={num!r}: must be an integer in "
                f"[1, {len(images)}], the {split} examples of the data set."
            )
        kept.update({f"{split}_images": images[:num], f"{split}_labels": labels[:num]})
    return dataset._replace(**kept) if kept else dataset


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


def device_batches(iterator: Iterator[Batch], mesh: Any, prefetch_size: int) -> Iterator[Any]:
    """Host batches as global arrays sharded over ``mesh`` (`distributed.put_batch`).

    With ``prefetch_size > 0`` the transfers run that many batches ahead on a
    background thread (`prefetch`).
    """
    put = functools.partial(distributed.put_batch, mesh=mesh)
    return prefetch(iterator, prefetch_size, put=put) if prefetch_size > 0 else map(put, iterator)


def preprocess(images_uint8: jax.Array, info: DatasetInfo = CIFAR10.info) -> jax.Array:
    """Map uint8 images to float32, scaled to [0, 1] and normalised per channel.

    Args:
      images_uint8: NHWC images.
      info: The data set, whose training-set ``mean`` and ``std`` normalise
        (CIFAR-10's by default).
    """
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(info.mean, jnp.float32)) / jnp.asarray(info.std, jnp.float32)


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
