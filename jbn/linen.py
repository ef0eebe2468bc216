"""``jbn.BatchNorm``: a ``flax.linen`` drop-in over the functional core."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes, initializers

from jbn import functional, validation

Array = jax.Array
Dtype = Any
Initializer = Any


class BatchNorm(nn.Module):
    """BatchNorm with the arguments, defaults and variables of ``flax.linen.BatchNorm``.

    Replacing ``flax.linen.BatchNorm`` with ``jbn.BatchNorm`` changes nothing
    else: same constructor and call arguments, the same ``params/{scale,bias}``
    and ``batch_stats/{mean,var}`` variables (checkpoints move both ways), the
    same output dtype. What changes: the variance is computed in one pass *and*
    stays accurate when ``|mean| >> std`` (``use_fast_variance`` is accepted for
    compatibility; both settings give this variance), and the backward pass is
    the closed form.

    The extras (all off by default):
      unbiased_running_var: store ``n / (n - 1) * var`` like PyTorch.
      track_count: keep ``batch_stats/count`` (PyTorch's
        ``num_batches_tracked``); needed for ``momentum=None``.
      virtual_batch_size: Ghost BatchNorm groups along axis 0 in training.

    Attributes:
      use_running_average: Normalize with the running statistics.
      axis: Feature axis or axes.
      momentum: Decay of the running statistics, or ``None`` for a cumulative
        average (requires ``track_count=True``).
      epsilon: Added to the variance.
      dtype: Output dtype (default: inferred from the input and parameters).
      param_dtype: Dtype of ``scale`` and ``bias``.
      use_bias: Add a learned bias.
      use_scale: Multiply by a learned scale.
      bias_init: Initializer of the bias.
      scale_init: Initializer of the scale.
      axis_name: Mapped axis name(s) whose devices share statistics.
      axis_index_groups: Groups of indices within ``axis_name``.
      use_fast_variance: Accepted for compatibility with Flax (see above).
      force_float32_reductions: Keep the running statistics in float32.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | tuple[str, ...] | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    track_count: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``; in training also updates ``batch_stats``.

        Args:
          x: Input.
          use_running_average: Overrides the attribute of the same name.
          mask: Boolean array broadcastable to ``x``: the elements that count.

        Returns:
          The normalized input.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        feature_axes = validation.canonical_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[ax] for ax in feature_axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
        )
        ra_count = None
        if self.track_count:
            ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=self.dtype)

        stats = {"mean": ra_mean.value, "var": ra_var.value}
        if ra_count is not None:
            stats["count"] = ra_count.value
        y, new_stats = functional.batch_norm(
            x,
            params or None,
            stats,
            training=not use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=feature_axes,
            axis_name=None if self.is_initializing() else self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            unbiased_running_var=self.unbiased_running_var,
            virtual_batch_size=self.virtual_batch_size,
            dtype=dtype,
        )
        if not use_running_average and not self.is_initializing():
            ra_mean.value = new_stats["mean"]
            ra_var.value = new_stats["var"]
            if ra_count is not None:
                ra_count.value = new_stats["count"]
        return y
