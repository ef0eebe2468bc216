"""A native XLA:CPU kernel for the RGB input convolution, through ``jax.ffi``.

`conv3x3_small` is the stride-1 ``SAME`` 3x3 convolution of an input with 1-4
channels into 8, 16 or 32 outputs (NHWC, HWIO, float32). On the CPU its
forward pass and kernel gradient run `csrc/conv3x3_small.cc`; on other
platforms, and wherever the kernel is unavailable, the same function computes
patches @ kernel with XLA (`jbn.ops.patch_conv`). Measured on SmallBNConvNet's train
step: ``python -m bench.bench_train_step``.

The kernel is compiled on first use with the machine's C++ compiler (about
7 s here, once) and cached, checksummed, by `jbn.native.library`. Without a
compiler, or if the build fails (a warning says why), `available` is False
and callers use XLA's path. Set ``JBN_NO_NATIVE=1`` to never build or use it.

The kernel gradient sums each image in float32 over blocks of rows and the
images in float64, in a fixed order: the same bits whatever the number of
threads.

Example:
    >>> import jax.numpy as jnp
    >>> from jbn.ops import native
    >>> x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    >>> native.conv3x3_small(x, k).shape
    (2, 8, 8, 16)
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn.native import library
from jbn.ops import patch_conv as patch_conv_lib

__all__ = ["OPT_OUT_ENV", "available", "conv3x3_small", "supports"]

OPT_OUT_ENV = library.OPT_OUT_ENV
SOURCE = pathlib.Path(__file__).with_name("csrc") / "conv3x3_small.cc"
_FORWARD = "JbnConv3x3SmallForward"
_KERNEL_GRAD = "JbnConv3x3SmallKernelGrad"


def available() -> bool:
    """Whether the native CPU kernel is built and registered (building it if needed)."""
    return library.load(SOURCE, (_FORWARD, _KERNEL_GRAD))


def supports(
    x_shape: Sequence[int], kernel_shape: Sequence[int], dtype: Any, kernel_dtype: Any = None
) -> bool:
    """Whether `conv3x3_small` runs natively on the CPU for these shapes and dtypes.

    Needs float32 ``x`` and kernel, ``x`` of shape ``(N, H, W, C)`` with
    ``1 <= C <= 4`` (``N`` may be 0), a ``(3, 3, C, O)`` kernel with ``O`` in
    (8, 16, 32), ``W`` divisible by 4 (by 2 when ``O`` is 32), and `available`.

    Args:
        x_shape: Shape of the input.
        kernel_shape: Shape of the kernel.
        dtype: Dtype of the input (and of the kernel, unless ``kernel_dtype``).
        kernel_dtype: Dtype of the kernel, when it differs from ``dtype``.
    """
    kernel_dtype = dtype if kernel_dtype is None else kernel_dtype
    if len(x_shape) != 4 or len(kernel_shape) != 4:
        return False
    if tuple(kernel_shape[:3]) != (3, 3, x_shape[-1]) or min(x_shape[1:]) < 1:
        return False
    if jnp.dtype(kernel_dtype) != jnp.float32:
        return False
    channels, width, outputs = x_shape[-1], x_shape[2], kernel_shape[-1]
    pixels = 4 if outputs <= 16 else 2
    return (
        jnp.dtype(dtype) == jnp.float32
        and 1 <= channels <= 4
        and outputs in (8, 16, 32)
        and width % pixels == 0
        and available()
    )


def _native_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:3], kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(x, kernel)


def _native_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_KERNEL_GRAD, out, vmap_method="sequential")(x, dy)


@jax.custom_vjp
def conv3x3_small(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 ``SAME`` 3x3 convolution (NHWC, HWIO), natively on the CPU.

    Equals ``jbn.ops.patch_conv.patch_conv(x, kernel)`` up to float rounding, in
    value and in both gradients (reverse mode only), on every platform.

    Args:
        x: Input of shape ``(N, H, W, C)``.
        kernel: Kernel of shape ``(3, 3, C, O)``.

    Returns:
        Output of shape ``(N, H, W, O)``.

    Raises:
        ValueError: If `supports` is False for these shapes and dtype.
    """
    _check(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=_native_forward, default=patch_conv_lib.patch_conv)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if not supports(x.shape, kernel.shape, x.dtype, kernel.dtype):
        raise ValueError(
            f"conv3x3_small: unsupported x {x.shape} {x.dtype} / kernel {kernel.shape} "
            f"{kernel.dtype} or no native kernel; check jbn.ops.native.supports first."
        )


def _conv3x3_small_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, Any]:
    return conv3x3_small(x, kernel), (x, kernel)


def _conv3x3_small_bwd(residuals: Any, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    # patch_conv's gradients, with the native kernel gradient on the CPU (where
    # XLA then drops the unused patch matrix, and an input layer's x_grad).
    x_grad, xla_kernel_grad = jax.vjp(patch_conv_lib.patch_conv, x, kernel)[1](dy)
    kernel_grad = lax.platform_dependent(
        x, dy, cpu=_native_kernel_grad, default=lambda x, dy: xla_kernel_grad
    )
    return x_grad, kernel_grad


conv3x3_small.defvjp(_conv3x3_small_fwd, _conv3x3_small_bwd)
