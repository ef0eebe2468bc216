"""Residual blocks of the ResNets (He et al. 2016), NHWC, in torchvision's layout.

`BasicBlock` (two 3x3 convolutions) and `Bottleneck` (1x1, 3x3, 1x1 with 4x
expansion, the stride on the 3x3 as in torchvision's "v1.5") name their
layers as torchvision does (``conv1``, ``bn1``, ..., ``downsample_0`` and
``downsample_1`` for ``downsample.0``/``.1``), so PyTorch state dicts map onto
them (`jbn.tools.interop_torch`). Padding is explicit and symmetric, as
PyTorch's ``padding=k // 2`` (flax's ``"SAME"`` pads strided convolutions
asymmetrically).

Shortcuts where the shape changes: ``"B"`` a 1x1 projection (convolution +
norm, torchvision's ``downsample``), ``"A"`` the parameter-free identity of
He et al. 2016, section 4.2 (every second pixel, zero channels added evenly on
both sides), ``"none"`` no shortcut at all (the plain networks of the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn.models.norm import ModuleFactory

__all__ = [
    "ACTIVATIONS",
    "HE_NORMAL",
    "SHORTCUTS",
    "BasicBlock",
    "Bottleneck",
    "conv_layer",
    "shortcut_a",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
}
SHORTCUTS = ("A", "B", "none")
# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (k * k * out)).
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_layer(
    features: int,
    kernel: int,
    *,
    strides: int = 1,
    use_bias: bool,
    kernel_init: Callable[..., jax.Array],
    dtype: Any,
    name: str,
) -> nn.Conv:
    """A ``kernel x kernel`` convolution padded like PyTorch's ``padding=kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        dtype=dtype,
        name=name,
    )


def shortcut_a(x: jax.Array, features: int, strides: int) -> jax.Array:
    """Option A: subsample by ``strides``, then pad channels with zeros to ``features``."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(f"shortcut 'A' cannot reduce {x.shape[-1]} channels to {features}")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _Block(nn.Module):
    """Shared attributes and helpers of the residual blocks.

    Attributes:
        features: Output channels of the inner convolutions (the block outputs
            ``features * expansion``).
        strides: Stride of the block (spatial downsampling).
        norm: Norm-layer factory (``use_running_average=``, ``name=``, and
            ``scale_init=`` for ``zero_init_residual``), or ``None`` for no
            normalisation (the convolutions then have a bias).
        shortcut: ``"A"``, ``"B"`` or ``"none"`` (see the module docstring).
        activation: Elementwise nonlinearity.
        zero_init_residual: Start the block's last norm scale at 0, so the
            block begins as its shortcut (Goyal et al. 2017).
        kernel_init: Initializer of the convolution kernels.
        dtype: Computation dtype.
    """

    features: int
    strides: int = 1
    norm: ModuleFactory | None = None
    shortcut: str = "B"
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    zero_init_residual: bool = False
    kernel_init: Callable[..., jax.Array] = HE_NORMAL
    dtype: Any = jnp.float32

    expansion = 1

    def _conv(self, features: int, kernel: int, name: str, strides: int = 1) -> nn.Conv:
        return conv_layer(
            features,
            kernel,
            strides=strides,
            use_bias=self.norm is None,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            name=name,
        )

    def _norm(self, x: jax.Array, name: str, train: bool, last: bool = False) -> jax.Array:
        if self.norm is None:
            return x
        kwargs = {"scale_init": nn.initializers.zeros} if last and self.zero_init_residual else {}
        return self.norm(use_running_average=not train, name=name, **kwargs)(x)

    def _merge(self, out: jax.Array, x: jax.Array, train: bool) -> jax.Array:
        """``activation(out + shortcut(x))``, or ``activation(out)`` without a shortcut."""
        if self.shortcut == "none":
            return self.activation(out)
        features = out.shape[-1]
        if self.strides != 1 or x.shape[-1] != features:
            if self.shortcut == "A":
                x = shortcut_a(x, features, self.strides)
            elif self.shortcut == "B":
                x = self._conv(features, 1, "downsample_0", self.strides)(x)
                x = self._norm(x, "downsample_1", train)
            else:
                raise ValueError(f"Unknown shortcut {self.shortcut!r}; expected one of {SHORTCUTS}")
        return self.activation(out + x)


class BasicBlock(_Block):
    """Two 3x3 convolutions (the first strided) with a shortcut around them."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns ``activation(bn2(conv2(activation(bn1(conv1(x))))) + shortcut(x))``."""
        out = self._conv(self.features, 3, "conv1", self.strides)(x)
        out = self.activation(self._norm(out, "bn1", train))
        out = self._conv(self.features, 3, "conv2")(out)
        out = self._norm(out, "bn2", train, last=True)
        return self._merge(out, x, train)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided, torchvision v1.5), 1x1 expand by 4, with a shortcut."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns ``activation(bn3(conv3(...conv1(x))) + shortcut(x))``."""
        out = self._conv(self.features, 1, "conv1")(x)
        out = self.activation(self._norm(out, "bn1", train))
        out = self._conv(self.features, 3, "conv2", self.strides)(out)
        out = self.activation(self._norm(out, "bn2", train))
        out = self._conv(self.features * self.expansion, 1, "conv3")(out)
        out = self._norm(out, "bn3", train, last=True)
        return self._merge(out, x, train)
