"""Fold inference-mode BatchNorm into the preceding convolution or dense layer.

In eval mode BatchNorm is the per-feature affine map
``y = s * (z - mean) + bias_bn`` with ``s = scale / sqrt(var + epsilon)``. When
``z = x @ kernel + b`` (a Dense layer, or a convolution: both keep the output
features on the kernel's last axis), the composition is one layer with
``kernel' = kernel * s`` and ``b' = s * (b - mean) + bias_bn``. The folded
network computes the same eval outputs without the normalization pass.

Example:
  >>> import jax.numpy as jnp
  >>> import jbn
  >>> from jbn.tools.folding import fold_into_dense
  >>> kernel, stats = jnp.ones((3, 2)), {"mean": jnp.ones(2), "var": jnp.full(2, 4.0)}
  >>> k, b = fold_into_dense(kernel, None, jbn.init_params(2), stats, epsilon=0.0)
  >>> k[0].tolist(), b.tolist()
  ([0.5, 0.5], [-0.5, -0.5])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["fold_into_conv", "fold_into_dense", "fold_small_bn_convnet"]

Array = jax.Array


def _fold(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float,
) -> tuple[Array, Array]:
    kernel = jnp.asarray(kernel)
    features = kernel.shape[-1]
    mean = jnp.asarray(bn_stats["mean"], jnp.float32)
    var = jnp.asarray(bn_stats["var"], jnp.float32)
    if mean.shape != (features,) or var.shape != (features,):
        raise ValueError(
            f"BatchNorm statistics of shape {mean.shape}/{var.shape} do not match the "
            f"{features} output features of a kernel of shape {kernel.shape}"
        )
    bn_params = bn_params or {}
    multiplier = jax.lax.rsqrt(var + epsilon)
    if "scale" in bn_params:
        multiplier = multiplier * bn_params["scale"]
    offset = -mean * multiplier
    if bias is not None:
        offset = offset + multiplier * bias
    if "bias" in bn_params:
        offset = offset + bn_params["bias"]
    return (kernel * multiplier).astype(kernel.dtype), offset.astype(kernel.dtype)


def fold_into_conv(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an eval-mode BatchNorm that follows a convolution into it.

    Args:
      kernel: Convolution kernel, ``(*window, in, out)`` (``flax.linen.Conv``
        layout; grouped convolutions too, the output features stay last).
      bias: Convolution bias ``(out,)`` or ``None``.
      bn_params: BatchNorm ``{"scale", "bias"}`` (either may be absent) or ``None``.
      bn_stats: BatchNorm running ``{"mean", "var"}``.
      epsilon: The BatchNorm's epsilon.

    Returns:
      ``(kernel, bias)`` of the folded convolution, in the kernel's dtype.

    Raises:
      ValueError: If the statistics do not match the output features.
    """
    return _fold(kernel, bias, bn_params, bn_stats, epsilon)


def fold_into_dense(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an eval-mode BatchNorm that follows a dense layer into it.

    Args:
      kernel: Dense kernel ``(in, out)``.
      bias: Dense bias ``(out,)`` or ``None``.
      bn_params: BatchNorm ``{"scale", "bias"}`` (either may be absent) or ``None``.
      bn_stats: BatchNorm running ``{"mean", "var"}``.
      epsilon: The BatchNorm's epsilon.

    Returns:
      ``(kernel, bias)`` of the folded dense layer, in the kernel's dtype.

    Raises:
      ValueError: If the statistics do not match the output features.
    """
    return _fold(kernel, bias, bn_params, bn_stats, epsilon)


def fold_small_bn_convnet(variables: Mapping[str, Any], epsilon: float = 1e-5) -> dict[str, Any]:
    """Folds every BatchNorm of a ``SmallBNConvNet`` into its convolution.

    Args:
      variables: ``{"params", "batch_stats"}`` of ``SmallBNConvNet(widths=...)``.
      epsilon: The BatchNorm layers' epsilon (the model's ``epsilon``).

    Returns:
      ``{"params"}`` for ``SmallBNConvNet(widths=..., use_batch_norm=False)``
      (the no-BN baseline, whose convolutions have biases), whose outputs equal
      the BN model's eval-mode outputs.
    """
    params, stats = variables["params"], variables["batch_stats"]
    folded: dict[str, Any] = {}
    i = 0
    while f"conv{i}" in params:
        conv = params[f"conv{i}"]
        kernel, bias = fold_into_conv(
            conv["kernel"], conv.get("bias"), params.get(f"bn{i}"), stats[f"bn{i}"], epsilon
        )
        folded[f"conv{i}"] = {"kernel": kernel, "bias": bias}
        i += 1
    folded["head"] = dict(params["head"])
    return {"params": folded}
