"""A stride-1 ``SAME`` convolution computed as image patches times a matrix.

XLA:CPU runs ``lax.conv_general_dilated`` through Eigen's spatial convolution,
which is slow when the input has very few channels (the RGB input layer of a
CNN: 3 channels, a contraction of only 27 per output pixel), and whose
kernel gradient needs transposed copies of the input and of the output
gradient. Written as ``patches @ kernel`` the same convolution is one
matrix product for the forward pass and one for the kernel gradient, and the
patch matrix built for the forward pass is the residual of the backward pass.

`jbn.ops.conv.PatchConv` is the ``flax.linen.Conv`` drop-in built on it. The
gradient is a custom VJP: reverse mode (``jax.grad``, ``jax.vjp``) works,
forward mode (``jax.jvp``) does not.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.ops.patch_conv import patch_conv
    >>> x, k = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8))
    >>> patch_conv(x, k).shape
    (1, 4, 4, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["image_patches", "patch_conv"]


def image_patches(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """``SAME``-padded stride-1 patches: ``(N, H, W, C) -> (N, H, W, kh * kw * C)``.

    Feature ``(i * kw + j) * C + c`` of output pixel ``(h, w)`` is
    ``x[h + i - (kh - 1) // 2, w + j - (kw - 1) // 2, c]`` (zero outside), so
    the patches times ``kernel.reshape(-1, out)`` is the convolution.
    """
    kh, kw = kernel_size
    _, height, width, _ = x.shape
    pad_h, pad_w = kh - 1, kw - 1
    padded = jnp.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    # Columns first (a concatenation of slices along W), then rows: slicing the
    # outer H axis of the intermediate copies whole contiguous rows.
    columns = jnp.concatenate([padded[:, :, j : j + width] for j in range(kw)], axis=-1)
    return jnp.concatenate([columns[:, i : i + height] for i in range(kh)], axis=-1)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"patch_conv: expected x of shape (N, H, W, C) and kernel of shape "
            f"(kh, kw, C, out), got {x.shape} and {kernel.shape}."
        )
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"patch_conv: x has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]}."
        )


def _matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.dot_general(
        patches, kernel.reshape(-1, kernel.shape[-1]), (((patches.ndim - 1,), (0,)), ((), ()))
    )


@jax.custom_vjp
def patch_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 ``SAME`` convolution (NHWC, HWIO), as ``image_patches(x) @ kernel``.

    Equals ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` up to float rounding, in value
    and in both gradients.

    Args:
        x: Input of shape ``(N, H, W, C)``.
        kernel: Kernel of shape ``(kh, kw, C, out)``.

    Returns:
        Output of shape ``(N, H, W, out)``.

    Raises:
        ValueError: If the shapes do not match.
    """
    _check(x, kernel)
    return _matmul(image_patches(x, kernel.shape[:2]), kernel)


def _patch_conv_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, Any]:
    _check(x, kernel)
    patches = image_patches(x, kernel.shape[:2])
    return _matmul(patches, kernel), (patches, kernel)


def _patch_conv_bwd(residuals: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    patches, kernel = residuals
    rows = patches.shape[0] * patches.shape[1] * patches.shape[2]
    # Explicit shapes (no -1): an empty batch has zero rows and a zero kernel gradient.
    patch_matrix = patches.reshape(rows, patches.shape[-1])
    g_matrix = g.reshape(rows, g.shape[-1])
    # (out, rows) @ (rows, kh*kw*C): the output gradient transposed, times the
    # patches as they are, so no copy of the (larger) patch matrix is needed.
    kernel_grad = lax.dot_general(g_matrix.T, patch_matrix, (((1,), (0,)), ((), ())))
    x_grad = lax.conv_transpose(
        g,
        kernel,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        transpose_kernel=True,
    )
    return x_grad.astype(patches.dtype), kernel_grad.T.reshape(kernel.shape).astype(kernel.dtype)


patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)
