"""A native XLA:CPU kernel for the RGB input convolution, through ``jax.ffi``.

`conv3x3_small` is the stride-1 ``SAME`` 3x3 convolution of an input with 1-4
channels into 8, 16 or 32 outputs (NHWC, HWIO, float32). On the CPU its
forward pass and kernel gradient run `csrc/conv3x3_small.cc`; on other
platforms, and wherever the kernel is unavailable, the same function computes
patches @ kernel with XLA (`jbn.ops.patch_conv`). Measured on SmallBNConvNet's train
step: ``python -m bench.bench_train_step``.

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``,
default ``g++``; about 15 s, once) against the XLA FFI headers that jaxlib
ships, and cached under the user cache directory (``$JBN_CACHE_DIR`` or
``pooch.os_cache("jbn")``), keyed by the source, jaxlib version and CPU. Without
a compiler, or if the build fails (a warning says why), `available` is False
and callers use XLA's path. Set ``JBN_NO_NATIVE=1`` to never build or use it.

Example:
    >>> import jax.numpy as jnp
    >>> from jbn.ops import native
    >>> x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    >>> native.conv3x3_small(x, k).shape
    (2, 8, 8, 16)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import pooch
from jax import lax

from jbn.ops import patch_conv as patch_conv_lib

__all__ = ["OPT_OUT_ENV", "available", "conv3x3_small", "supports"]

OPT_OUT_ENV = "JBN_NO_NATIVE"
CACHE_DIR_ENV = "JBN_CACHE_DIR"
_SOURCE = pathlib.Path(__file__).with_name("csrc") / "conv3x3_small.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC")
_FORWARD = "JbnConv3x3SmallForward"
_KERNEL_GRAD = "JbnConv3x3SmallKernelGrad"


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (``-march=native`` builds are CPU-specific)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _library_path(compiler: str) -> pathlib.Path:
    key = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        importlib.metadata.version("jaxlib").encode(),
        compiler.encode(),
        " ".join(_FLAGS).encode(),
        platform.machine().encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
    base = pathlib.Path(os.environ.get(CACHE_DIR_ENV) or pooch.os_cache("jbn"))
    return base / "native" / f"conv3x3_small-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
    """Compiles the kernel into ``target`` (atomically: concurrent processes are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = pathlib.Path(scratch) / target.name
        command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE)]
        subprocess.run([*command, "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)


@functools.cache
def _load() -> bool:
    """Builds (once per machine) and registers the kernel; False where it cannot."""
    if os.environ.get(OPT_OUT_ENV):
        return False
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return False
    library = _library_path(compiler)
    try:
        if not library.exists():
            _build(compiler, library)
        handlers = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"jbn.ops.native: could not build or load {library} ({detail.strip()[-500:]}); "
            "using XLA's convolution instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for name in (_FORWARD, _KERNEL_GRAD):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handlers, name)), "cpu")
    return True


def available() -> bool:
    """Whether the native CPU kernel is built and registered (building it if needed)."""
    return _load()


def supports(x_shape: Sequence[int], kernel_shape: Sequence[int], dtype: Any) -> bool:
    """Whether `conv3x3_small` runs natively on the CPU for these shapes and dtype.

    Needs float32, ``x`` of shape ``(N, H, W, C)`` with ``1 <= C <= 4``, a
    ``(3, 3, C, O)`` kernel with ``O`` in (8, 16, 32), ``W`` divisible by 4 (by 2
    when ``O`` is 32), and `available`.
    """
    if len(x_shape) != 4 or tuple(kernel_shape[:3]) != (3, 3, x_shape[-1]):
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
    if not supports(x.shape, kernel.shape, jnp.result_type(x, kernel)):
        raise ValueError(
            f"conv3x3_small: unsupported x {x.shape} / kernel {kernel.shape} "
            f"({jnp.result_type(x, kernel)}) or no native kernel; check jbn.ops.native.supports first."
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
