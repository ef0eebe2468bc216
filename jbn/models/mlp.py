"""The fully connected network of the BatchNorm paper's Figure 1 (NHWC images, flax.linen).

Ioffe & Szegedy (2015), section 4.1: three hidden layers of 100 sigmoid units
on flattened images, then a linear classifier; the BatchNorm variant
normalises each hidden layer's pre-activations before its sigmoid::

    Flatten -> [Dense(100) -> BN -> sigmoid] x 3 -> Dense(num_classes)

Without BatchNorm (``use_batch_norm=False``) the hidden layers are plain
``Dense(100)`` with a bias followed by the sigmoid; with it, the hidden
``Dense`` layers have no bias (BatchNorm's ``bias`` replaces it).

Each hidden layer's input to its nonlinearity (after BatchNorm where there is
one) is sown into the ``"intermediates"`` collection as
``pre_activation_<layer>`` (layers counted from 1), so a probe can follow the
distribution one sigmoid sees over training (`jbn.train.activation_probe`).
Sowing is free in the train step, which does not make ``"intermediates"``
mutable.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.models import MLP
    >>> model = MLP()
    >>> x = jnp.zeros((4, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> _, sown = model.apply(variables, x, train=False, mutable=["intermediates"])
    >>> sown["intermediates"]["pre_activation_3"][0].shape
    (4, 100)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn.models.blocks import ACTIVATIONS
from jbn.models.norm import ModuleFactory, norm_factory

__all__ = ["MLP", "pre_activation_name"]


def pre_activation_name(layer: int) -> str:
    """The ``"intermediates"`` name of hidden layer ``layer``'s (1-based) nonlinearity input."""
    return f"pre_activation_{layer}"


class MLP(nn.Module):
    """Flatten, hidden ``Dense -> [BN] -> activation`` layers, then a linear classifier.

    Attributes:
        num_classes: Number of output logits.
        widths: Units of each hidden layer (the paper: three of 100).
        activation: ``"sigmoid"`` (the paper's), ``"relu"`` or ``"tanh"``.
        use_batch_norm: Normalise each hidden layer's pre-activations; if
            False the hidden ``Dense`` layers have a bias instead.
        momentum: Running-statistics decay of the default norm layer (Flax
            convention: ``new = momentum * old + (1 - momentum) * batch``).
        epsilon: Added to the variance by the default norm layer.
        virtual_batch_size: Ghost BatchNorm group size of the default norm layer
            (``None``: statistics over the whole batch).
        norm: Factory of the normalisation layer, called with
            ``use_running_average=...`` and ``name=...``; overrides
            ``momentum``/``epsilon``/``virtual_batch_size`` when given.
        dtype: Computation dtype of the ``Dense`` layers.
    """

    num_classes: int = 10
    widths: Sequence[int] = (100, 100, 100)
    activation: str = "sigmoid"
    use_batch_norm: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    virtual_batch_size: int | None = None
    norm: ModuleFactory | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Computes logits.

        Args:
            x: Images, float ``[N, H, W, C]`` (or any ``[N, ...]``; flattened).
            train: Normalise with batch statistics and update ``batch_stats``
                (call ``apply`` with ``mutable=["batch_stats"]``); otherwise use
                the running statistics.

        Returns:
            Logits of shape ``[N, num_classes]``.

        Raises:
            ValueError: For an unknown ``activation``.
        """
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {self.activation!r}; expected one of {tuple(ACTIVATIONS)}."
            )
        activation = ACTIVATIONS[self.activation]
        norm = norm_factory(
            self.norm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            virtual_batch_size=self.virtual_batch_size,
        )
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            x = nn.Dense(
                width, use_bias=not self.use_batch_norm, dtype=self.dtype, name=f"dense{i}"
            )(x)
            if self.use_batch_norm:
                x = norm(use_running_average=not train, name=f"bn{i}")(x)
            self.sow("intermediates", pre_activation_name(i + 1), x)
            x = activation(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
