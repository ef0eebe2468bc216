"""SmallBNConvNet, the seed CNN of the project, and its variants (NHWC, flax.linen).

The network of the reference notebook::

    Conv(3->16, 3x3, SAME, no bias) -> BN -> ReLU -> MaxPool(2)
    Conv(16->32, 3x3, SAME, no bias) -> BN -> ReLU -> MaxPool(2)
    Flatten -> Dense(32 * 8 * 8 -> 10)

Variants: other ``widths`` (one conv block per entry), ``num_classes``, a no-BN
baseline (``use_batch_norm=False``: convolutions get a bias, no normalisation)
and any normalisation layer through ``norm``, a factory called with
``use_running_average=not train`` (``jbn.BatchNorm`` by default, so
``flax.linen.BatchNorm`` can be swapped in for comparisons).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.models import SmallBNConvNet
    >>> model = SmallBNConvNet()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    >>> sorted(variables)
    ['batch_stats', 'params']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn.models.norm import ModuleFactory, norm_factory
from jbn.ops.conv import PatchConv
from jbn.ops.pooling import max_pool

__all__ = ["SmallBNConvNet"]

PoolFn = Callable[[jax.Array, int], jax.Array]


class SmallBNConvNet(nn.Module):
    """Conv -> BN -> ReLU -> MaxPool blocks followed by a linear classifier.

    Attributes:
        num_classes: Number of output logits.
        widths: Output channels of each 3x3 convolution block.
        use_batch_norm: Normalise after each convolution; if False the
            convolutions have a bias instead (the no-BN baseline).
        momentum: Running-statistics decay of the default norm layer (Flax
            convention: ``new = momentum * old + (1 - momentum) * batch``).
        epsilon: Added to the variance by the default norm layer.
        virtual_batch_size: Ghost BatchNorm group size of the default norm layer
            (``None``: statistics over the whole batch).
        norm: Factory of the normalisation layer, called with
            ``use_running_average=...`` and ``name=...``; overrides
            ``momentum``/``epsilon``/``virtual_batch_size`` when given.
        pool: ``pool(x, window)`` non-overlapping max pooling.
        pool_window: Pooling window and stride.
        patch_conv_channels: Convolutions whose input has at most this many
            channels (the RGB input) run as `jbn.ops.conv.PatchConv` (same
            maths and variables as ``nn.Conv``, faster on XLA:CPU); 0: never.
        native_input_conv: Let those convolutions use the compiled CPU kernel
            (``PatchConv(native=True)``, `jbn.ops.native`); for one device only.
        dtype: Computation dtype of convolutions and the classifier.
    """

    num_classes: int = 10
    widths: Sequence[int] = (16, 32)
    use_batch_norm: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    virtual_batch_size: int | None = None
    norm: ModuleFactory | None = None
    pool: PoolFn = max_pool
    pool_window: int = 2
    patch_conv_channels: int = 4
    native_input_conv: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Computes logits.

        Args:
            x: Images, float ``[N, H, W, C]``; ``H`` and ``W`` divisible by
                ``pool_window ** len(widths)``.
            train: Normalise with batch statistics and update ``batch_stats``
                (call ``apply`` with ``mutable=["batch_stats"]``); otherwise use
                the running statistics.

        Returns:
            Logits of shape ``[N, num_classes]``.
        """
        norm = norm_factory(
            self.norm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            virtual_batch_size=self.virtual_batch_size,
        )
        for i, width in enumerate(self.widths):
            if x.shape[-1] <= self.patch_conv_channels:
                conv = functools.partial(PatchConv, native=self.native_input_conv)
            else:
                conv = nn.Conv
            x = conv(
                width,
                (3, 3),
                padding="SAME",
                use_bias=not self.use_batch_norm,
                dtype=self.dtype,
                name=f"conv{i}",
            )(x)
            if self.use_batch_norm:
                x = norm(use_running_average=not train, name=f"bn{i}")(x)
            # max_pool(relu(x)) == relu(max_pool(x)), gradients included (ReLU is
            # monotone and relu'(0) = 0): the ReLU runs on 4x fewer elements.
            x = nn.relu(self.pool(x, self.pool_window))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
