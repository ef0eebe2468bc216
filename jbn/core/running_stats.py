"""Running statistics: their initial values and their update from batch moments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn.core.statistics import Moments

Array = jax.Array
BatchStats = Mapping[str, Array]  # {"mean": (C,), "var": (C,)}, optional "count": ()
Shape = int | Sequence[int]


def feature_shape(num_features: Shape) -> tuple[int, ...]:
    """``(C,)`` for an int, else the given feature shape as a tuple of ints."""
    if isinstance(num_features, int):
        return (num_features,)
    return tuple(int(n) for n in num_features)


def init_batch_stats(
    num_features: Shape, dtype: Any = jnp.float32, *, with_count: bool = False
) -> dict[str, Array]:
    """Returns running statistics: ``mean`` zeros and ``var`` ones.

    Args:
      num_features: Number of features ``C``, or the feature shape.
      dtype: Statistics dtype (float32 by default, whatever the input dtype).
      with_count: Also track ``count``, the number of training steps seen (an
        int32 scalar, PyTorch's ``num_batches_tracked``). Required for the
        cumulative average, ``momentum=None``.
    """
    shape = feature_shape(num_features)
    stats = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}
    if with_count:
        stats["count"] = jnp.zeros((), jnp.int32)
    return stats


def update_running_stats(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> dict[str, Array]:
    """Returns running statistics updated with this batch's moments.

    ``new = momentum * old + (1 - momentum) * batch`` (Flax's decay convention;
    PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here). ``momentum=None`` is
    the cumulative average of all batches seen, which needs ``stats["count"]``.
    A feature whose batch had no valid element keeps its old value, and so does
    the variance of a feature with one valid element when it must be unbiased.

    Args:
      stats: ``{"mean", "var"}`` and optionally ``"count"`` (steps seen, int).
      batch: Moments of the current batch.
      momentum: Decay of the old value, in ``[0, 1]``, or ``None``.
      unbiased_running_var: Store ``n / (n - 1) * var`` like PyTorch.
    """
    if "count" in stats:
        steps = stats["count"] + 1
    elif momentum is None:
        raise ValueError(
            'momentum=None (cumulative average) needs stats["count"]; '
            "create them with init_batch_stats(..., with_count=True)."
        )
    new_mean_dtype, new_var_dtype = stats["mean"].dtype, stats["var"].dtype
    mean, var, count = (lax.stop_gradient(s) for s in batch)
    # The wider of the running and the batch dtype, chosen explicitly (no
    # promotion, so it also runs under jax_numpy_dtype_promotion="strict").
    dtype = max(jnp.dtype(new_mean_dtype), jnp.dtype(mean.dtype), key=lambda d: d.itemsize)
    if momentum is None:
        decay = 1.0 - 1.0 / steps.astype(dtype)
    else:
        decay = momentum
    mean, var, count = (s.astype(dtype) for s in (mean, var, count))
    if unbiased_running_var:
        var = var * count / jnp.maximum(count - 1, 1)
    new_mean = decay * stats["mean"].astype(dtype) + (1 - decay) * mean
    new_var = decay * stats["var"].astype(dtype) + (1 - decay) * var
    new_stats = dict(stats)
    new_mean = jnp.where(count > 0, new_mean, stats["mean"].astype(dtype))
    new_stats["mean"] = new_mean.astype(new_mean_dtype)
    min_count = 1 if unbiased_running_var else 0
    new_var = jnp.where(count > min_count, new_var, stats["var"].astype(dtype))
    new_stats["var"] = new_var.astype(new_var_dtype)
    if "count" in stats:
        new_stats["count"] = steps.astype(stats["count"].dtype)
    return new_stats
