"""Pure functional BatchNorm: normalization with batch or running statistics.

Everything here is a pure function of arrays and returns new arrays; nothing
is mutated. The training-mode normalization has a closed-form derivative
(:func:`_normalize_with_batch_stats`, a ``jax.custom_jvp``) so it works under
``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.lax.scan`` and
``jax.checkpoint``, saves only its input as a full-size residual, and needs a
single collective for the statistics of the forward pass and a single one for
the backward pass when ``axis_name`` is given.

Example:
  >>> import jax.numpy as jnp
  >>> import jbn
  >>> x = jnp.arange(12.0).reshape(4, 3)
  >>> params, stats = jbn.init_params(3), jbn.init_batch_stats(3)
  >>> y, stats = jbn.batch_norm(x, params, stats, training=True, momentum=0.9)
  >>> y.shape, stats["mean"].shape
  ((4, 3), (3,))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn.core import running_stats, statistics, validation
from jbn.core.running_stats import init_batch_stats, update_running_stats
from jbn.core.statistics import Moments, moments

Array = jax.Array
Axes = int | Sequence[int]
AxisName = Any  # str, or a tuple of str (several mapped axes)
Params = Mapping[str, Array]  # {"scale": (C,), "bias": (C,)}
BatchStats = Mapping[str, Array]  # {"mean": (C,), "var": (C,)}, optional "count": ()
Shape = int | Sequence[int]

__all__ = [
    "Moments",
    "batch_norm",
    "init_batch_stats",
    "init_params",
    "moments",
    "normalize",
    "update_running_stats",
]


def init_params(num_features: Shape, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Returns the affine parameters: ``scale`` ones and ``bias`` zeros.

    Args:
      num_features: Number of features ``C``, or the feature shape when several
        axes are features.
      dtype: Parameter dtype.
    """
    shape = running_stats.feature_shape(num_features)
    return {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}


def _centred_moments(
    x: Array,
    mask: Array | None,
    reduction_axes: tuple[int, ...],
    epsilon: float,
    axis_name: AxisName,
    axis_index_groups: Any,
) -> tuple[Array, Moments, Array]:
    """Returns ``x - mean`` (float32 or wider), the moments, and ``rsqrt(var + eps)``."""
    moments_ = statistics.keepdims_moments(x, mask, reduction_axes, axis_name, axis_index_groups)
    xf = x.astype(statistics.stats_dtype(x.dtype))
    return xf - moments_.mean, moments_, lax.rsqrt(moments_.var + epsilon)


def _per_feature_affine(
    rstd: Array, scale: Array | None, bias: Array | None
) -> tuple[Array, Array | float]:
    """Per-feature ``(multiplier, offset)`` so that ``y = centred * multiplier + offset``.

    Computing these on the small per-feature arrays first keeps ``rsqrt`` and
    the products out of the per-element loop.
    """
    multiplier = rstd if scale is None else rstd * scale
    return multiplier, 0.0 if bias is None else bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8))
def _normalize_with_batch_stats(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    reduction_axes: tuple[int, ...],
    epsilon: float,
    axis_name: AxisName,
    axis_index_groups: Any,
    out_dtype: Any,
) -> tuple[Array, Array, Array, Array]:
    """Training-mode BatchNorm on ``keepdims``-shaped parameters.

    Returns:
      ``(y, mean, var, count)``; the statistics keep the reduced axes as size 1.
    """
    centred, (mean, var, count), rstd = _centred_moments(
        x, mask, reduction_axes, epsilon, axis_name, axis_index_groups
    )
    multiplier, offset = _per_feature_affine(rstd, scale, bias)
    y = centred * multiplier + offset
    return y.astype(out_dtype), mean, var, count


@_normalize_with_batch_stats.defjvp
def _normalize_with_batch_stats_jvp(
    reduction_axes, epsilon, axis_name, axis_index_groups, out_dtype, primals, tangents
):
    """Closed-form derivative of batch normalization.

    With ``d = x - mean``, ``a = scale * rstd`` and ``w`` the mask, the
    tangent is ``a * (dx - mean_w(dx)) - d * a * rstd^2 * mean_w(d dx)
    + d * rstd * dscale + dbias``. Its transpose (the backward pass) has the
    same form and needs two sums (one collective under ``axis_name``). Both
    products with ``d`` go through `_times_deviation`, so reverse mode keeps
    one full-size residual, the input ``x`` (plus per-feature arrays), and
    recomputes ``d`` from it.
    """
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    centred, (mean, var, count), rstd = _centred_moments(
        x, mask, reduction_axes, epsilon, axis_name, axis_index_groups
    )
    multiplier, offset = _per_feature_affine(rstd, scale, bias)
    y = centred * multiplier + offset

    dxf = dx.astype(centred.dtype)
    weighted = dxf if mask is None else _valid_only(dxf, mask)
    # Two separate sums (not one stacked array): their transposes then stay
    # plain per-feature broadcasts that XLA:CPU hoists out of the element loop.
    sums = statistics.reduce_across_devices(
        (
            jnp.sum(weighted, reduction_axes, keepdims=True),
            jnp.sum(_times_deviation(x, mean, weighted, None), reduction_axes, keepdims=True),
        ),
        axis_name,
        axis_index_groups,
    )
    mean_dx, mean_centred_dx = (total / jnp.maximum(count, 1) for total in sums)
    centred_coef = -multiplier * jnp.square(rstd) * mean_centred_dx
    if scale is not None:
        centred_coef = centred_coef + rstd * dscale.astype(centred.dtype)
    constant = -multiplier * mean_dx
    if bias is not None:
        constant = constant + dbias.astype(centred.dtype)
    # One cast of both coefficients to per-device values: its transpose is the
    # backward pass's only psum (two casts would transpose to two).
    centred_coef, constant = statistics.as_varying_like(
        tuple(jnp.broadcast_arrays(centred_coef, constant)), centred, axis_name
    )
    deviation_term = _times_deviation(x, mean, centred_coef, reduction_axes)
    dy = dxf * multiplier + deviation_term + constant
    primal_out = (y.astype(out_dtype), mean, var, count)
    tangent_out = (dy.astype(out_dtype), mean_dx, 2 * mean_centred_dx, jnp.zeros_like(count))
    return primal_out, tangent_out


@functools.partial(jax.checkpoint, prevent_cse=False)
def _valid_only(tangent: Array, mask: Array) -> Array:
    """``where(mask, tangent, 0)``; its residual is the boolean mask, not a float array of zeros."""
    return jnp.where(mask, tangent, 0)


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(3,))
def _times_deviation(
    x: Array, mean: Array, factor: Array, rows_axes: tuple[int, ...] | None
) -> Array:
    """``(x - mean) * factor`` (float32 or wider), recomputed from ``x`` in reverse mode.

    ``factor`` is a tangent, so this product is linear. Under ``jax.checkpoint``
    its residuals are its inputs, ``x`` and the small ``mean``, instead of the
    full-size ``x - mean``: reverse mode keeps ``x`` as the layer's only
    full-size residual and recomputes ``x - mean`` where the backward pass
    needs it (inside one ``jit``, fused into the consuming loop). No
    optimisation barrier (``prevent_cse=False``): XLA schedules it freely.

    With ``rows_axes`` (the reduced axes, for a per-feature ``factor``) the
    subtraction is written as ``view + (-mean)`` on
    `statistics.reduction_view`, so it is distinct from every other
    ``x - mean`` (the variance's ``view - mean`` included): reverse mode turns the product into
    ``sum(g * (x - mean))``, and XLA:CPU then fuses the subtraction into that
    reduction instead of materialising a centred copy of ``x``.
    """
    xf = x.astype(statistics.stats_dtype(x.dtype))
    view = None if rows_axes is None else statistics.reduction_view(xf, rows_axes)
    if view is None:
        return (xf - mean) * factor
    scaled = (view.array + view.per_feature(-mean)) * view.per_feature(factor)
    return scaled.reshape(x.shape)


def _keepdims_shape(x_shape: Sequence[int], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if ax in feature_axes else 1 for ax, n in enumerate(x_shape))


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    params: Params | None = None,
    *,
    epsilon: float = 1e-5,
    axis: Axes = -1,
    dtype: Any = None,
) -> Array:
    """Returns ``scale * (x - mean) / sqrt(var + epsilon) + bias``.

    Args:
      x: Input array.
      mean: Per-feature mean, shaped like the features.
      var: Per-feature variance, shaped like the features.
      params: ``{"scale", "bias"}`` (either key may be absent) or ``None``.
      epsilon: Added to the variance.
      axis: Feature axis or axes of ``x``.
      dtype: Output dtype (default: ``x.dtype``).
    """
    x = jnp.asarray(x)
    feature_axes = validation.canonical_axes(x.ndim, axis)
    shape = _keepdims_shape(x.shape, feature_axes)
    stats_dtype = statistics.stats_dtype(x.dtype)
    scale, bias = _params_keepdims(params, shape, stats_dtype)
    mean = jnp.reshape(mean, shape).astype(stats_dtype)
    var = jnp.reshape(var, shape).astype(stats_dtype)
    multiplier = lax.rsqrt(var + epsilon)
    if scale is not None:
        multiplier = multiplier * scale
    y = (x.astype(stats_dtype) - mean) * multiplier
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype if dtype is None else dtype)


def _params_keepdims(
    params: Params | None, shape: tuple[int, ...], dtype: Any
) -> tuple[Array | None, Array | None]:
    """``scale`` and ``bias`` reshaped to ``shape`` and cast to the statistics' ``dtype``.

    Explicit shapes and dtypes, so that nothing relies on rank or dtype
    promotion (``jax_numpy_rank_promotion="raise"``,
    ``jax_numpy_dtype_promotion="strict"``).
    """
    if params is None:
        return None, None
    scale, bias = params.get("scale"), params.get("bias")
    return (
        None if scale is None else jnp.reshape(scale, shape).astype(dtype),
        None if bias is None else jnp.reshape(bias, shape).astype(dtype),
    )


def batch_norm(
    x: Array,
    params: Params | None,
    stats: BatchStats,
    *,
    training: bool,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis: Axes = -1,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    unbiased_running_var: bool = False,
    virtual_batch_size: int | None = None,
    dtype: Any = None,
) -> tuple[Array, dict[str, Array]]:
    """Batch normalization, returning the output and the new running statistics.

    In training, normalizes with the statistics of this batch (over every axis
    but ``axis``, and over ``axis_name`` when mapped) and updates the running
    statistics; otherwise normalizes with ``stats`` and returns them unchanged.

    Args:
      x: Input, any rank; features along ``axis`` (NHWC: ``-1``; NCHW: ``1``).
      params: ``{"scale", "bias"}`` shaped like the features, or ``None``.
      stats: Running statistics, ``{"mean", "var"}`` (+ ``"count"``).
      training: Use and update batch statistics (True) or use ``stats``.
      momentum: Decay of the running statistics (``None``: cumulative average).
      epsilon: Added to the variance; must be positive and finite.
      axis: Feature axis or axes.
      axis_name: Mapped axis name(s) whose devices share statistics.
      axis_index_groups: Groups of indices within ``axis_name``.
      mask: Boolean array broadcastable to ``x``: elements that count.
      unbiased_running_var: Store the unbiased variance (PyTorch convention).
      virtual_batch_size: Ghost BatchNorm (Hoffer et al. 2017): in training,
        split axis 0 into groups of this size, each normalized with its own
        statistics; the running statistics move towards the average of the
        groups' statistics (count-weighted).
      dtype: Output dtype (default: ``x.dtype``).

    Returns:
      ``(y, new_stats)``.

    Raises:
      TypeError: If ``x`` is not real floating point (complex inputs are refused).
      ValueError: On bad shapes, hyper-parameters or masks (before any update).
    """
    x = jnp.asarray(x)
    feature_axes = validation.check_batch_norm_args(
        x,
        params,
        stats,
        training=training,
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        mask=mask,
        mapped=axis_name is not None,
    )
    mask = validation.check_mask(mask, x.shape)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    if not training:
        y = normalize(
            x,
            stats["mean"],
            stats["var"],
            params,
            epsilon=epsilon,
            axis=feature_axes,
            dtype=out_dtype,
        )
        return y, dict(stats)
    if virtual_batch_size is not None:
        x, mask, feature_axes = _split_into_ghost_batches(x, mask, feature_axes, virtual_batch_size)
    kept_axes = feature_axes if virtual_batch_size is None else (0, *feature_axes)
    reduction_axes = tuple(ax for ax in range(x.ndim) if ax not in kept_axes)
    scale, bias = _params_keepdims(
        params, _keepdims_shape(x.shape, feature_axes), statistics.stats_dtype(x.dtype)
    )
    y, mean, var, count = _normalize_with_batch_stats(
        x,
        scale,
        bias,
        mask,
        reduction_axes,
        float(epsilon),
        _hashable(axis_name),
        _hashable(axis_index_groups),
        out_dtype,
    )
    if virtual_batch_size is None:
        batch = Moments(*(s.reshape(feature_shape) for s in (mean, var, count)))
    else:
        y = y.reshape((-1, *y.shape[2:]))
        batch = statistics.average_ghost_moments(Moments(mean, var, count), feature_shape)
    new_stats = update_running_stats(
        stats, batch, momentum=momentum, unbiased_running_var=unbiased_running_var
    )
    return y, new_stats


def _split_into_ghost_batches(
    x: Array, mask: Array | None, feature_axes: tuple[int, ...], virtual_batch_size: int
) -> tuple[Array, Array | None, tuple[int, ...]]:
    """Reshapes axis 0 into ``(groups, virtual_batch_size)``."""
    if 0 in feature_axes:
        raise ValueError("virtual_batch_size splits axis 0, which must not be a feature axis")
    if virtual_batch_size <= 0 or x.shape[0] % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} must be positive and divide the "
            f"batch size {x.shape[0]}"
        )
    shape = (x.shape[0] // virtual_batch_size, virtual_batch_size, *x.shape[1:])
    mask = None if mask is None else mask.reshape(shape)
    return x.reshape(shape), mask, tuple(ax + 1 for ax in feature_axes)


def _hashable(value: Any) -> Any:
    """Lists (of lists) to tuples, for ``nondiff_argnums``."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value
