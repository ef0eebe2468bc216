"""Non-overlapping max pooling written as a reshape + max, with an exact VJP.

`flax.linen.max_pool` lowers to ``lax.reduce_window``; its gradient is XLA's
``select_and_scatter``, which on XLA:CPU dominates the SmallBNConvNet train
step. For the common case of non-overlapping square windows (stride equal to
the window, ``VALID`` padding) the same forward is a reshape that splits each
spatial axis into ``(H // k, k)`` followed by a max over the two window axes.

``jnp.max``'s own gradient splits the cotangent evenly between tied maxima,
which differs from ``reduce_window`` (and PyTorch), where the whole gradient
goes to the *first* maximal element of each window in row-major order. The
custom VJP below reproduces that rule exactly with element-wise ops and two
small reductions (no transposes, no scatter), so it fuses well.

Example:
    >>> import jax.numpy as jnp
    >>> from jbn.ops.pooling import max_pool
    >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[..., 0]
    Array([[[ 5.,  7.],
            [13., 15.]]], dtype=float32)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["max_pool"]


def _check(x: jax.Array, window: int) -> tuple[int, int]:
    """Validates the input and returns the pooled spatial size ``(H // k, W // k)``."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"max_pool: window must be a positive int, got {window!r}.")
    if x.ndim < 3:
        raise ValueError(f"max_pool: expected input of shape (..., H, W, C), got shape {x.shape}.")
    height, width = x.shape[-3], x.shape[-2]
    if height % window or width % window:
        raise ValueError(
            f"max_pool: spatial size ({height}, {width}) is not divisible by window "
            f"{window}; crop or pad the input first, or use flax.linen.max_pool for "
            "VALID floor behaviour."
        )
    return height // window, width // window


def _windows(x: jax.Array, window: int) -> jax.Array:
    """Reshapes ``(..., H, W, C)`` to ``(..., H/k, k, W/k, k, C)``."""
    out_h, out_w = _check(x, window)
    return x.reshape(*x.shape[:-3], out_h, window, out_w, window, x.shape[-1])


# Axes of the two window dimensions in the ``_windows`` layout, counted from the end.
_WINDOW_AXES = (-4, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int) -> jax.Array:
    """Max pooling over non-overlapping ``window x window`` patches (NHWC).

    Equivalent to ``flax.linen.max_pool(x, (window, window), strides=(window,
    window), padding="VALID")`` in value and in gradient: the gradient of each
    window goes to its first maximal element in row-major order, as with
    ``lax.reduce_window`` / ``select_and_scatter`` and ``torch.nn.MaxPool2d``.
    A window whose maximum is NaN passes no gradient.

    Args:
        x: Array of shape ``(..., H, W, C)``; ``H`` and ``W`` must be divisible
            by ``window``.
        window: Side of the square window, also the stride.

    Returns:
        Array of shape ``(..., H // window, W // window, C)`` and dtype of ``x``.

    Raises:
        ValueError: If ``window`` is not a positive int, ``x`` has fewer than 3
            dimensions, or the spatial size is not divisible by ``window``.
    """
    return functools.reduce(jnp.maximum, sum(_window_element_rows(x, window), []))


def _window_element_rows(x: jax.Array, window: int) -> list[list[jax.Array]]:
    """The strided views ``x[..., i::k, j::k, :]``, as rows ``i`` of columns ``j``.

    Elementwise maxima of these views fuse into one pass on XLA:CPU, where a
    reduction over the two window axes of a reshaped array does not.
    """
    xw = _windows(x, window)
    return [[xw[..., i, :, j, :] for j in range(window)] for i in range(window)]


def _max_pool_fwd(x: jax.Array, window: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Returns the pooled output and, as residuals, it and the argmax of each window.

    The argmax (int8, row-major position of the first maximum) is computed in
    the same pass as the maximum, so the backward pass needs neither ``x`` nor
    a comparison against it.
    """
    elements = sum(_window_element_rows(x, window), [])
    # In training the output comes from reduce_window (same values): XLA:CPU
    # materialises it instead of recomputing the layers below inside the
    # transposes of the next convolution's weight gradient (~10% of the step).
    dims = (1,) * (x.ndim - 3) + (window, window, 1)
    y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")
    index_dtype = jnp.int8 if len(elements) <= 127 else jnp.int32
    best, argmax = elements[0], jnp.zeros(y.shape, index_dtype)
    for position, element in enumerate(elements[1:], start=1):
        better = element > best  # Strict: the first maximum wins ties.
        best = jnp.where(better, element, best)
        argmax = jnp.where(better, jnp.asarray(position, index_dtype), argmax)
    return y, (y, argmax)


def _max_pool_bwd(
    window: int, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array]:
    y, argmax = residuals
    g = jnp.where(jnp.isnan(y), jnp.zeros((), g.dtype), g)  # A NaN window passes nothing.
    # One elementwise pass over (..., H/k, k, W/k, k, C), which is (..., H, W, C)
    # in memory: each element takes its window's cotangent if it is the argmax.
    rows = jnp.arange(window, dtype=argmax.dtype).reshape(window, 1, 1, 1)
    cols = jnp.arange(window, dtype=argmax.dtype).reshape(window, 1)
    position = rows * window + cols  # (k, 1, k, 1), broadcasts against the window axes.
    expand = (-2, -4)  # (..., H/k, W/k, C) -> (..., H/k, 1, W/k, 1, C)
    chosen = jnp.expand_dims(argmax, expand) == position
    dx = jnp.where(chosen, jnp.expand_dims(g, expand), jnp.zeros((), g.dtype))
    return (dx.reshape(*y.shape[:-3], -1, y.shape[-2] * window, y.shape[-1]),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
