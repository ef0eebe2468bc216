"""Batch statistics: per-feature moments, on one device or merged across devices.

Moments accumulate in float32 or wider whatever the input dtype.

**One read on the CPU.** For float32 ``x`` without a mask whose reduced axes
are adjacent (NHWC, ``(N, C)``, ghost batches) and which lies whole on one
device, the CPU runs `jbn.native.moments`, a compiled kernel that reads ``x``
once: shifted sums ``sum(x - p)`` and ``sum((x - p)**2)`` around a
per-feature pivot ``p`` (the average of 32 rows spread over the batch),
float32 over runs of 32 rows and float64 across them, and a second read
around the mean only where the pivot lies more than one standard deviation
from it. Its relative error against the float64 sum around the float32 mean
is at most about 5e-6 whatever the offset (measured 2.7e-7 at ``|mean| / std
= 1e4`` on random data; `jbn.native.moments`), and the result is the same
bits whatever the number of threads.

Everywhere else (masks, NCHW, other dtypes, sharded ``jit`` inputs, GPUs and
TPUs) XLA computes two reductions: the mean, then the squared deviations from
it. On XLA:CPU each reads ``x`` once with ``x - mean`` fused in, and no
centred copy is written (with a mask, the masked values are: YNNPACK's
reductions take no select). XLA:CPU (jaxlib 0.10) could not do the one read
itself: it does not fuse sibling reductions, and a single reduction of both
sums falls back to its own emitter (2.7-10x slower; ``python -m
bench.bench_one_read`` times every form).

**Accuracy.** The float mean ``m`` is off the true one by about one rounding
(``|m - mean| <~ 2**-23 |mean|`` in float32), and the variance is that
around ``m``: ``var + (m - mean)**2`` plus the rounding of the sums, so its
relative error is about ``(1.2e-7 |mean| / std)**2 + 2e-7`` in float32 on
either path: measured for the two passes (256 x 8 x 8 values per feature, 5
seeds) 9e-8 at ``mean = 0``, 1.2e-6 at ``|mean| / std = 1e4``, 4.7e-5 at 1e5
and 2.3e-4 at 1e6, so within 1e-5 up to ``|mean| / std`` of about 2.5e4. The
variance is never negative; a constant feature gives exactly 0 when its float
mean is exact, else the square of that rounding (9e-16 for 0.1).
In float32 ``E[x^2] - E[x]^2`` (flax's fast variance) was off by 0.2% at
1e2, 13% at 1e3 and 15x at 1e4.

Across mapped devices (``axis_name``) the per-device moments are merged
count-weighted (Chan et al.) after a single collective (a ``psum`` that
gathers them, `gather_with_psum`), which makes masks with unequal valid
counts per device exact; each device also sends the sum of its deviations
from its float mean, which keeps the merged variance as accurate as one
device's (measured over 8 devices: 1.3e-6 at 1e4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn.core import validation
from jbn.native import moments as native_moments

Array = jax.Array
Axes = int | Sequence[int]
AxisName = Any  # str, or a tuple of str (several mapped axes)


class Moments(NamedTuple):
    """Per-feature batch statistics.

    Attributes:
      mean: Batch mean, float32 (or wider), shaped like the features.
      var: Biased batch variance, ``mean((x - mean) ** 2)``, never negative.
      count: Number of elements that entered each statistic (float).
    """

    mean: Array
    var: Array
    count: Array


def stats_dtype(dtype: Any) -> Any:
    """Statistics are accumulated in float32 or wider.

    Chosen explicitly, not by promotion, so it also holds under
    ``jax_numpy_dtype_promotion="strict"`` (where bfloat16 and float32 do not promote).
    """
    dtype = jnp.dtype(dtype)
    wide = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4
    return dtype if wide else jnp.dtype(jnp.float32)


class ReductionView(NamedTuple):
    """``x`` reshaped so that each run of adjacent reduced (or kept) axes is one axis.

    Attributes:
      array: The reshaped ``x`` (a free reshape).
      axes: Its reduced axes.
      keepdims_shape: Shape of a per-feature array broadcast against ``array``.
    """

    array: Array
    axes: tuple[int, ...]
    keepdims_shape: tuple[int, ...]

    def per_feature(self, values: Array) -> Array:
        """``values`` (keepdims shape of ``x``) reshaped to broadcast against ``array``."""
        return values.reshape(self.keepdims_shape)


def reduction_view(x: Array, reduction_axes: tuple[int, ...]) -> ReductionView | None:
    """``x`` reshaped to another shape with the same features, or None.

    Adjacent reduced axes and adjacent kept axes merge: NHWC becomes
    ``(N*H*W, C)`` (rows), NCHW ``(N, C, H*W)``; where none are adjacent (``(N,
    C)``), an even reduced axis splits in two. A subtraction written on this
    view, instead of on ``x``, is its own HLO: XLA's CSE then cannot merge it
    with the ``x - mean`` that other consumers compute on ``x``, and XLA:CPU
    fuses a subtraction into a reduction only when the reduction is its sole
    user (otherwise ``x - mean`` is written to memory and read back, one extra
    pass). None when neither is possible.
    """
    groups: list[tuple[bool, tuple[int, ...]]] = []  # (reduced, sizes) per run of axes
    for ax, size in enumerate(x.shape):
        reduced = ax in reduction_axes
        if groups and groups[-1][0] == reduced:
            groups[-1] = (reduced, groups[-1][1] + (size,))
        else:
            groups.append((reduced, (size,)))
    shape = [math.prod(sizes) for _, sizes in groups]
    reduced = [flag for flag, _ in groups]
    if len(shape) == x.ndim:
        even = [i for i, n in enumerate(shape) if reduced[i] and n % 2 == 0]
        if not even:
            return None
        shape[even[0] : even[0] + 1] = [shape[even[0]] // 2, 2]
        reduced[even[0] : even[0] + 1] = [True, True]
    axes = tuple(i for i, flag in enumerate(reduced) if flag)
    keepdims = tuple(1 if flag else n for flag, n in zip(reduced, shape, strict=True))
    return ReductionView(x.reshape(shape), axes, keepdims)


def _sums_of_deviations(
    x: Array,
    mean: Array,
    mask: Array | None,
    reduction_axes: tuple[int, ...],
    with_first_power: bool,
) -> tuple[Array, Array | None]:
    """``sum((x - mean) ** 2)`` and optionally ``sum(x - mean)`` over valid elements (keepdims).

    Each is one reduction reading ``x`` with the subtraction fused in: the
    squares on `reduction_view` (``view - mean``), the first powers on ``x``
    as ``x + (-mean)``, both distinct from the normalisation's ``x - mean``
    and from the backward pass's ``view + (-mean)``. Shared, XLA:CPU would
    write ``x - mean`` (or the broadcast ``mean``) to memory and read it back.
    """

    def valid(values: Array, where: Array | None) -> Array:
        return values if where is None else jnp.where(where, values, 0)

    view = reduction_view(x, reduction_axes)
    if view is None:
        m2 = jnp.sum(valid(jnp.square(x - mean), mask), reduction_axes, keepdims=True)
    else:
        view_mask = (
            None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(view.array.shape)
        )
        squares = jnp.square(view.array - view.per_feature(mean))
        m2 = jnp.sum(valid(squares, view_mask), view.axes, keepdims=True).reshape(mean.shape)
    if not with_first_power:
        return m2, None
    return m2, jnp.sum(valid(x + (-mean), mask), reduction_axes, keepdims=True)


def two_pass_moments(
    x: Array, mask: Array | None, reduction_axes: tuple[int, ...], with_deviation_sum: bool
) -> tuple[Array, Array, Array, Array | None]:
    """Count, mean and sum of squared deviations over this device's data, with XLA.

    Two passes over ``x`` (the mean, then the squared deviations from it), so
    the variance stays accurate when ``|mean| >> std``, unlike
    ``E[x^2] - E[x]^2``. On XLA:CPU each pass is one fused reduction that
    reads ``x`` (see `_sums_of_deviations`).

    Returns:
      ``(count, mean, m2, deviation_sum)`` with ``keepdims`` shapes, where
      ``deviation_sum = sum(x - mean)`` (``None`` unless asked for): zero in
      exact arithmetic, it measures how far the float ``mean`` is from the
      true one, which `_merge_across_devices` needs.
    """
    if mask is None:
        count = math.prod(x.shape[ax] for ax in reduction_axes)
        mean = jnp.sum(x, reduction_axes, keepdims=True) / count
        count = jnp.full(mean.shape, count, x.dtype)
    else:
        count = jnp.sum(mask, reduction_axes, dtype=x.dtype, keepdims=True)
        mean = jnp.sum(jnp.where(mask, x, 0), reduction_axes, keepdims=True)
        mean = mean / jnp.maximum(count, 1)
    m2, deviation_sum = _sums_of_deviations(x, mean, mask, reduction_axes, with_deviation_sum)
    return count, mean, m2, deviation_sum


def rows_shape(shape: Sequence[int], reduction_axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """``(groups, rows, features)``: ``shape`` with its reduced axes as one run of rows.

    Possible when the reduced axes are adjacent (NHWC, ``(N, C)``, ghost
    batches): the kept axes before them are groups, those after them features.
    None otherwise (NCHW) and when nothing is reduced.
    """
    axes = sorted(reduction_axes)
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    first, last = axes[0], axes[-1] + 1
    return (math.prod(shape[:first]), math.prod(shape[first:last]), math.prod(shape[last:]))


def _one_read_moments(
    x: Array, reduction_axes: tuple[int, ...], rows: tuple[int, ...]
) -> tuple[Array, Array, Array, Array]:
    """`two_pass_moments` of float32 ``x`` without a mask, in one read on the CPU.

    `jbn.native.moments` on ``x`` viewed as ``rows`` (`rows_shape`): the
    compiled kernel on the CPU, XLA's reductions on other platforms.
    """
    mean, m2, deviation_sum = native_moments.moments(x.reshape(rows))
    keepdims = tuple(1 if ax in reduction_axes else n for ax, n in enumerate(x.shape))
    mean, m2, deviation_sum = (r.reshape(keepdims) for r in (mean, m2, deviation_sum))
    return jnp.full(keepdims, rows[1], x.dtype), mean, m2, deviation_sum


def _local_moments(
    x: Array, mask: Array | None, reduction_axes: tuple[int, ...], with_deviation_sum: bool
) -> tuple[Array, Array, Array, Array | None]:
    """`two_pass_moments`, or `_one_read_moments` where the native kernel applies.

    The kernel applies to float32 ``x`` without a mask whose reduced axes are
    adjacent (`rows_shape`) and which lies whole on one device
    (`jbn.native.moments.runs_natively`). Other dtypes are cast to
    `stats_dtype` for XLA's passes (a cast XLA fuses into them; a kernel
    would need it written to memory first).
    """
    rows = None if mask is not None else rows_shape(x.shape, reduction_axes)
    if rows is not None and native_moments.runs_natively(x, rows):
        return _one_read_moments(x, reduction_axes, rows)
    xf = x.astype(stats_dtype(x.dtype))
    return two_pass_moments(xf, mask, reduction_axes, with_deviation_sum)


def _axis_names(axis_name: AxisName) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_names(x: Array) -> frozenset:
    """The mapped axes along which ``x`` varies (empty outside a checked ``shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)  # jax >= 0.9; older releases call it `vma`
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", frozenset()))


def as_varying_like(
    values: tuple[Array, ...], reference: Array, axis_name: AxisName
) -> tuple[Array, ...]:
    """``values`` cast to vary along ``axis_name`` where ``reference`` does, in one ``pcast``.

    Inside a checked ``shard_map``, combining a device-invariant array with a
    varying one inserts an implicit cast per operation, and reverse mode turns
    each cast into its own ``psum``. Casting the per-feature coefficients of
    the BatchNorm derivative together, stacked, keeps the backward pass at a
    single ``psum``. Elsewhere (no ``axis_name``, ``vmap``, ``check_vma=False``)
    it returns ``values`` unchanged.

    Args:
      values: Arrays of one shape.
      reference: An array that varies along ``axis_name`` inside ``shard_map``.
      axis_name: Mapped axis name(s), or None.
    """
    if axis_name is None or not set(_axis_names(axis_name)) <= _varying_names(reference):
        return values
    stacked = jnp.stack(values)
    missing = tuple(n for n in _axis_names(axis_name) if n not in _varying_names(stacked))
    if missing:
        stacked = lax.pcast(stacked, missing, to="varying")
    return tuple(stacked)


def _positions_in_groups(axis_index_groups: Any) -> tuple[int, tuple[int, ...]]:
    """Group size and each device index's position within its group."""
    groups = [list(group) for group in axis_index_groups]
    if len({len(group) for group in groups}) != 1:
        raise ValueError(f"axis_index_groups must all have one size, got {axis_index_groups}")
    positions = [0] * sum(len(group) for group in groups)
    for group in groups:
        for position, index in enumerate(group):
            positions[index] = position
    return len(groups[0]), tuple(positions)


def gather_with_psum(local: Array, axis_name: AxisName, axis_index_groups: Any) -> Array:
    """Every device's ``local``, stacked along a new leading axis, with one ``psum``.

    Each device writes its values into its own slot of an array of zeros and
    the slots are summed: exact (every other slot adds zeros), the result is
    device-invariant inside ``shard_map``, and it works over any set of mapped
    axes, where ``lax.all_gather`` fails over several nested ``vmap`` axes.
    It carries ``devices`` times the data of ``local``, as an all-gather's
    result does.

    Args:
      local: This device's array.
      axis_name: Mapped axis name(s); several names are flattened in order.
      axis_index_groups: Optional groups of indices within ``axis_name``
        (each device then gets its group's values).

    Returns:
      ``(devices, *local.shape)``: the devices of the group, in index order.
    """
    names = _axis_names(axis_name)
    index = lax.axis_index(names if len(names) > 1 else names[0])
    if axis_index_groups is None:
        size = lax.axis_size(names if len(names) > 1 else names[0])
    else:
        size, positions = _positions_in_groups(axis_index_groups)
        index = jnp.asarray(positions)[index]
    own_slot = (jnp.arange(size) == index).reshape((size,) + (1,) * local.ndim)
    slots = jnp.where(own_slot, local[None], jnp.zeros((), local.dtype))
    return lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)


def _merge_across_devices(
    count: Array,
    mean: Array,
    m2: Array,
    deviation_sum: Array,
    axis_name: AxisName,
    axis_index_groups: Any,
) -> tuple[Array, Array, Array]:
    """Count-weighted merge (Chan et al.) of per-device moments, one collective.

    Device ``d`` contributes ``sum((x - M) ** 2) = m2_d + 2 (mean_d - M) s_d +
    count_d (mean_d - M) ** 2`` to the merged sum around the merged mean ``M``,
    exactly for any float ``mean_d``, with ``s_d = sum(x - mean_d)`` (its
    deviation sum). Chan et al.'s formula drops the middle term, which is zero
    only for an exact mean: in float32 at ``|mean| / std = 1e4`` the rounding
    of ``mean_d`` (about 5e-4) made that term a variance error of up to 1.5e-5
    over 8 devices. The same sums also correct ``M`` for the rounding of the
    per-device means.
    """
    gathered = gather_with_psum(
        jnp.stack([count, mean, m2, deviation_sum]), axis_name, axis_index_groups
    )
    counts, means, m2s, deviation_sums = (gathered[:, i] for i in range(4))
    total = jnp.sum(counts, 0, keepdims=True)
    sums = jnp.sum(counts * means, 0, keepdims=True) + jnp.sum(deviation_sums, 0, keepdims=True)
    mean_all = sums / jnp.maximum(total, 1)
    offsets = means - mean_all
    m2_all = jnp.sum(m2s + 2 * offsets * deviation_sums + counts * jnp.square(offsets), 0)
    return total[0], mean_all[0], jnp.maximum(m2_all, 0)


def keepdims_moments(
    x: Array,
    mask: Array | None,
    reduction_axes: tuple[int, ...],
    axis_name: AxisName,
    axis_index_groups: Any,
) -> Moments:
    """Moments with the reduced axes kept (size 1), merged across ``axis_name``."""
    mapped = axis_name is not None
    count, mean, m2, deviation_sum = _local_moments(x, mask, reduction_axes, mapped)
    if mapped:
        count, mean, m2 = _merge_across_devices(
            count, mean, m2, deviation_sum, axis_name, axis_index_groups
        )
    return Moments(mean, m2 / jnp.maximum(count, 1), count)


def reduce_across_devices(
    sums: tuple[Array, ...], axis_name: AxisName, axis_index_groups: Any
) -> tuple[Array, ...]:
    """``psum`` over ``axis_name`` of arrays of one shape, stacked into one operand.

    One operand, so one collective both ways: reverse mode transposes it into a
    single cast (checked ``shard_map``) or a single ``psum`` (``check_vma=False``).
    The identity when ``axis_name`` is None.
    """
    if axis_name is None:
        return sums
    return tuple(lax.psum(jnp.stack(sums), axis_name, axis_index_groups=axis_index_groups))


def moments(
    x: Array,
    *,
    axis: Axes = -1,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
) -> Moments:
    """Per-feature mean and biased variance over all non-feature axes.

    Accumulates in float32 (or wider), in one read of ``x`` on the CPU
    (`jbn.native.moments`) or two passes (the mean, then the squared
    deviations), and stays accurate when ``|mean| >> std`` (the module
    docstring gives the error bound). With ``axis_name``, per-device
    moments are merged count-weighted after a single ``psum`` (`gather_with_psum`).

    Args:
      x: Input array.
      axis: Feature axis or axes (kept); every other axis is reduced.
      mask: Optional boolean array broadcastable to ``x``: the elements to count.
      axis_name: Mapped axis name(s) to reduce over (``shard_map``, ``vmap``).
      axis_index_groups: Optional groups of indices within ``axis_name``.

    Returns:
      ``Moments(mean, var, count)`` shaped like the features.
    """
    x = jnp.asarray(x)
    validation.check_input_dtype(x.dtype, "moments")
    feature_axes = validation.canonical_axes(x.ndim, axis)
    reduction_axes = tuple(ax for ax in range(x.ndim) if ax not in feature_axes)
    mask = validation.check_mask(mask, x.shape)
    result = keepdims_moments(x, mask, reduction_axes, axis_name, axis_index_groups)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    return Moments(*(s.reshape(feature_shape) for s in result))


def average_ghost_moments(groups: Moments, feature_shape: tuple[int, ...]) -> Moments:
    """Count-weighted average over axis 0 of per-group moments."""
    mean, var, count = (s.reshape((-1, *feature_shape)) for s in groups)
    total = jnp.sum(count, 0, keepdims=True)
    weights = count / jnp.maximum(total, 1)
    return Moments(jnp.sum(weights * mean, 0), jnp.sum(weights * var, 0), total[0] / count.shape[0])
