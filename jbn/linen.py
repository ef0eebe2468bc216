"""``flax.linen`` modules over the functional core: ``BatchNorm`` and ``BatchRenorm``.

``jbn.BatchNorm`` is a drop-in for ``flax.linen.BatchNorm``; ``jbn.BatchRenorm``
(Ioffe 2017) has the same attributes and variables plus the clips ``r_max`` and
``d_max`` (`jbn.core.renorm`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes, initializers

from jbn.core import normalization, validation
from jbn.core.renorm import ClipSchedule, batch_renorm

Array = jax.Array
Dtype = Any
Initializer = Any


class _RunningStatsNorm(nn.Module):
    """The attributes and call prologue that `BatchNorm` and `BatchRenorm` share.

    The attributes are ``flax.linen.BatchNorm``'s, in its order (so positional
    arguments mean the same), then ``unbiased_running_var``; each subclass
    documents them and appends its own.
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

    # nn.nowrap: helpers of __call__, not module methods of their own, so that
    # nn.intercept_methods sees only __call__, as before they were shared.
    @nn.nowrap
    def _begin(
        self, x: Array, use_running_average: bool | None, mask: Array | None, with_count: bool
    ) -> _Call:
        """Merges ``use_running_average``, declares the variables, gathers the core's arguments."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        feature_axes, params, variables, dtype = declare_variables(self, x, with_count)
        stats = {key: variable.value for key, variable in variables.items()}
        core_args = {
            "training": not use_running_average,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "axis": feature_axes,
            "axis_name": None if self.is_initializing() else self.axis_name,
            "axis_index_groups": self.axis_index_groups,
            "mask": mask,
            "unbiased_running_var": self.unbiased_running_var,
            "dtype": dtype,
        }
        return _Call(x, params or None, stats, variables, core_args)

    @nn.nowrap
    def _end(self, call: _Call, new_stats: dict[str, Array]) -> None:
        store_running_stats(self, call.variables, new_stats, training=call.core_args["training"])


class _Call(NamedTuple):
    """What `_RunningStatsNorm._begin` prepares for one call of the core."""

    x: Array
    params: dict[str, Array] | None
    stats: dict[str, Array]
    variables: dict[str, Any]  # The batch_stats variables, written back by _end.
    core_args: dict[str, Any]  # Keyword arguments of jbn.core's batch_norm/batch_renorm.


class BatchNorm(_RunningStatsNorm):
    """BatchNorm with the arguments, defaults and variables of ``flax.linen.BatchNorm``.

    Replacing ``flax.linen.BatchNorm`` with ``jbn.BatchNorm`` changes nothing
    else: same constructor and call arguments, the same ``params/{scale,bias}``
    and ``batch_stats/{mean,var}`` variables (checkpoints move both ways), the
    same output dtype. What changes: the variance is computed from the
    deviations from the batch mean (two reductions, `jbn.core.statistics`), so
    it stays accurate when ``|mean| >> std`` (``use_fast_variance`` is accepted
    for compatibility; both settings give this variance), and the backward
    pass is the closed form. It runs under ``jax_numpy_rank_promotion="raise"``
    and ``jax_numpy_dtype_promotion="strict"`` (bfloat16 inputs included).
    Complex inputs, which ``flax.linen.BatchNorm(dtype=jnp.complex64)``
    normalizes, raise a ``TypeError`` (on purpose: jbn's derivative and
    statistics are for real activations).

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

    # use_running_average ... unbiased_running_var: inherited from _RunningStatsNorm, in order.
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
        call = self._begin(x, use_running_average, mask, with_count=self.track_count)
        y, new_stats = normalization.batch_norm(
            call.x,
            call.params,
            call.stats,
            virtual_batch_size=self.virtual_batch_size,
            **call.core_args,
        )
        self._end(call, new_stats)
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
    # flax.linen.BatchNorm's output dtype rule (standard promotion, also when
    # jax_numpy_dtype_promotion="strict" is set: only a dtype is computed here).
    with jax.numpy_dtype_promotion("standard"):
        dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    return feature_axes, params, variables, dtype


def store_running_stats(
    module: nn.Module, variables: dict[str, Any], new_stats: dict[str, Array], *, training: bool
) -> None:
    """Writes ``new_stats`` into the variables in training (not while initializing)."""
    if training and not module.is_initializing():
        for key, variable in variables.items():
            variable.value = new_stats[key]


class BatchRenorm(_RunningStatsNorm):
    """Batch Renormalization with the attributes and variables of ``jbn.BatchNorm``.

    Variables: ``params/{scale,bias}`` and ``batch_stats/{mean,var,count}``;
    ``count`` (the number of training steps seen) is always tracked and drives
    ``clip_schedule``. Ghost batches (``virtual_batch_size``) are not offered.

    Attributes:
      use_running_average: Normalize with the running statistics.
      axis: Feature axis or axes.
      momentum: Decay of the running statistics (Flax convention), or ``None``
        for a cumulative average.
      epsilon: Added to the variance.
      dtype: Output dtype (default: inferred from the input and parameters).
      param_dtype: Dtype of ``scale`` and ``bias``.
      use_bias: Add a learned bias.
      use_scale: Multiply by a learned scale.
      bias_init: Initializer of the bias.
      scale_init: Initializer of the scale.
      axis_name: Mapped axis name(s) whose devices share statistics.
      axis_index_groups: Groups of indices within ``axis_name``.
      use_fast_variance: Accepted for compatibility with Flax.
      force_float32_reductions: Keep the running statistics in float32.
      unbiased_running_var: Store ``n / (n - 1) * var`` like PyTorch.
      r_max: Clip of ``r`` (used when ``clip_schedule`` is ``None``).
      d_max: Clip of ``d`` (used when ``clip_schedule`` is ``None``).
      clip_schedule: ``step -> (r_max, d_max)``, e.g. ``functools.partial(
        renorm_clip_schedule, warmup_steps=5000, ramp_steps=40000)``.
    """

    # use_running_average ... unbiased_running_var: inherited from _RunningStatsNorm, in order.
    r_max: float = 3.0
    d_max: float = 5.0
    clip_schedule: ClipSchedule | None = None

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Renormalizes ``x``; in training also updates ``batch_stats``.

        Args:
          x: Input.
          use_running_average: Overrides the attribute of the same name.
          mask: Boolean array broadcastable to ``x``: the elements that count.

        Returns:
          The normalized input.
        """
        call = self._begin(x, use_running_average, mask, with_count=True)
        if self.clip_schedule is None:
            r_max, d_max = self.r_max, self.d_max
        else:
            r_max, d_max = self.clip_schedule(call.stats["count"])
        y, new_stats = batch_renorm(
            call.x, call.params, call.stats, r_max=r_max, d_max=d_max, **call.core_args
        )
        self._end(call, new_stats)
        return y
