"""Argument checks for BatchNorm, run on static shapes before any computation.

Every check raises before statistics are computed or updated, so bad input
can never corrupt running statistics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def canonical_axes(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted tuple of non-negative ints.

    Raises:
      ValueError: If an axis is out of range for ``ndim`` or repeated.
    """
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    result = []
    for ax in axes:
        if not isinstance(ax, numbers.Integral):
            raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")
        if not -ndim <= ax < ndim:
            raise ValueError(f"axis {ax} is out of range for an input of rank {ndim}")
        result.append(int(ax) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(sorted(result))


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """Returns ``mask`` as a boolean array broadcast to ``x_shape``, or None.

    Raises:
      ValueError: If ``mask`` cannot be broadcast to ``x_shape``.
    """
    if mask is None:
        return None
    mask_shape = tuple(np.shape(mask))
    try:
        np.broadcast_shapes(mask_shape, x_shape)
        if np.broadcast_shapes(mask_shape, x_shape) != tuple(x_shape):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"mask of shape {mask_shape} is not broadcastable to the input shape {tuple(x_shape)}"
        ) from None
    return jnp.broadcast_to(jnp.asarray(mask, bool), x_shape)


def _is_static_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (
        isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0
    )


def check_hyperparameters(momentum: Any, epsilon: Any) -> None:
    """Checks ``momentum`` in [0, 1] (or None) and ``epsilon`` > 0 and finite.

    Raises:
      ValueError: If either is out of range.
    """
    if _is_static_number(epsilon):
        if not math.isfinite(float(epsilon)) or float(epsilon) <= 0:
            raise ValueError(f"epsilon must be positive and finite, got {epsilon}")
    if momentum is not None and _is_static_number(momentum):
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (the decay of the running statistics), got {momentum}"
            )


def _check_feature_shape(
    name: str, arrays: Mapping[str, Any] | None, keys: Sequence[str], expected: tuple[int, ...]
) -> None:
    if arrays is None:
        return
    for key in keys:
        if key in arrays and arrays[key] is not None:
            got = tuple(np.shape(arrays[key]))
            if got != expected:
                raise ValueError(
                    f"{name}[{key!r}] has shape {got} but the input has {expected} features "
                    f"along the feature axis"
                )


def check_input_dtype(dtype: Any, name: str = "batch_norm") -> None:
    """Checks that ``dtype`` is a real floating-point dtype.

    Complex inputs are refused on purpose: ``flax.linen.BatchNorm(dtype=
    jnp.complex64)`` normalizes them (its running mean turns from float32 into
    complex64 at the first update), but jbn's closed-form derivative, its
    merged statistics and its float32 running statistics are defined for real
    activations.

    Raises:
      TypeError: If ``dtype`` is complex or not floating point.
    """
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} expects a real floating-point input, got dtype {dtype}: complex inputs "
            "are not supported (flax.linen.BatchNorm(dtype=jnp.complex64) normalizes them; "
            "see the README's Flax module section)"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} expects a floating-point input, got dtype {dtype}")


def check_batch_norm_args(
    x: jax.Array,
    params: Mapping[str, Any] | None,
    stats: Mapping[str, Any],
    *,
    training: bool,
    momentum: Any,
    epsilon: Any,
    axis: int | Sequence[int],
    mask: Any,
    mapped: bool = False,
) -> tuple[int, ...]:
    """Checks the arguments of ``batch_norm`` and returns the feature axes.

    Raises:
      TypeError: If ``x`` is not real floating point (complex inputs are refused).
      ValueError: On an empty input, mismatched feature counts, one value per
        feature in training, or bad hyper-parameters.
    """
    check_input_dtype(x.dtype)
    if x.ndim < 1:
        raise ValueError("batch_norm expects an input of rank >= 1, got a scalar")
    feature_axes = canonical_axes(x.ndim, axis)
    if x.size == 0:
        raise ValueError(f"batch_norm got an empty input of shape {x.shape}")
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    _check_feature_shape("params", params, ("scale", "bias"), feature_shape)
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(f"stats must hold 'mean' and 'var', got keys {sorted(stats)}")
    _check_feature_shape("stats", stats, ("mean", "var"), feature_shape)
    check_hyperparameters(momentum, epsilon)
    if training and mask is None and not mapped:
        per_feature = math.prod(x.shape) // math.prod(feature_shape)
        if per_feature <= 1:
            raise ValueError(
                f"Expected more than 1 value per feature when training, got input of shape "
                f"{x.shape} with feature axes {feature_axes}"
            )
    return feature_axes
