"""``PatchConv``: ``flax.linen.Conv`` (stride 1, ``SAME``) on jbn's convolution kernels.

XLA:CPU's own convolution is slow when the input has very few channels (the
RGB input layer of a CNN). `PatchConv` has the variables of ``nn.Conv``
(``kernel`` of shape ``(kh, kw, in, out)``, optional ``bias``) and computes
the convolution as `jbn.ops.patch_conv.patch_conv` (patches @ kernel) or, with
``native=True`` on the CPU, as the compiled kernel `jbn.ops.native.conv3x3_small`.
Use it where it measures faster (``python -m bench.bench_train_step``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.ops.conv import PatchConv
    >>> layer = PatchConv(8, use_bias=False)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    >>> variables["params"]["kernel"].shape
    (3, 3, 3, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn.ops import native
from jbn.ops.patch_conv import patch_conv

__all__ = ["PatchConv"]


class PatchConv(nn.Module):
    """``flax.linen.Conv`` (stride 1, ``SAME``, NHWC) computed with `patch_conv`.

    Attributes:
        features: Number of output channels.
        kernel_size: Spatial size of the kernel.
        padding: Only ``"SAME"`` (accepted for ``nn.Conv`` compatibility).
        use_bias: Add a learned bias.
        dtype: Computation dtype (default: inferred from input and params).
        param_dtype: Dtype of the parameters.
        kernel_init: Initializer of the kernel (flax's default).
        bias_init: Initializer of the bias.
        native: On the CPU, run 3x3 kernels with 1-4 input and 8, 16 or 32
            output channels as `jbn.ops.native.conv3x3_small` (a compiled kernel)
            where `jbn.ops.native.supports` them; XLA's patches elsewhere. Its
            custom call is not split by sharding: use it on one device.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
    native: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves ``x`` of shape ``(N, H, W, C)``; returns ``(N, H, W, features)``."""
        if self.padding != "SAME":
            raise ValueError(f"PatchConv supports padding='SAME' only, got {self.padding!r}.")
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.native and native.supports(x.shape, kernel.shape, x.dtype):
            y = native.conv3x3_small(x, kernel)
        else:
            y = patch_conv(x, kernel)
        return y if bias is None else y + bias
