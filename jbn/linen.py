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
        feature_axes, params, variables, dtype = declare_variables(self, x, self.track_count)
        stats = {key: variable.value for key, variable in variables.items()}
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
        store_running_stats(self, variables, new_stats, training=not use_running_average)
        return y


def declare_variables(
    module: nn.Module, x: Array, with_count: bool
) -> tuple[tuple[int, ...], dict[str, Array], dict[str, Any], Dtype]:
    """Declares the variables of a BatchNorm-like module as ``flax.linen.BatchNorm`` does.

    ``module`` needs BatchNorm's attributes (``axis``, ``use_scale``,
    ``param_dtype``, ...).

    Returns:
      ``(feature_axes, params, stats_variables, output_dtype)``: ``params``
      holds the present ``scale``/``bias`` values, ``stats_variables`` the
      ``batch_stats`` variables ``mean``, ``var`` (and ``count``).
    """
    feature_axes = validation.canonical_axes(x.ndim, module.axis)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    stats_dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype
    variables = {
        "mean": module.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
        ),
        "var": module.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
        ),
    }
    if with_count:
        variables["count"] = module.variable(
            "batch_stats", "count", lambda: jnp.zeros((), jnp.int32)
        )
    params = {}
    if module.use_scale:
        params["scale"] = module.param(
            "scale", module.scale_init, feature_shape, module.param_dtype
        )
    if module.use_bias:
        params["bias"] = module.param("bias", module.bias_init, feature_shape, module.param_dtype)
    dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    return feature_axes, params, variables, dtype


def store_running_stats(
    module: nn.Module, variables: dict[str, Any], new_stats: dict[str, Array], *, training: bool
) -> None:
    """Writes ``new_stats`` into the variables in training (not while initializing)."""
    if training and not module.is_initializing():
        for key, variable in variables.items():
            variable.value = new_stats[key]
