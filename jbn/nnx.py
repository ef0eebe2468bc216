"""``jbn.nnx.BatchNorm``: a ``flax.nnx`` drop-in over the functional core.

Same constructor, defaults and variables as ``flax.nnx.BatchNorm``
(``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``), so
``nnx.state`` moves both ways and ``model.train()`` / ``model.eval()`` /
``nnx.view`` work unchanged. Import it as ``import jbn.nnx`` (it is not
imported by ``import jbn``, which needs no ``flax.nnx``).

Example:
  >>> import jax
  >>> from flax import nnx
  >>> import jbn.nnx
  >>> layer = jbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  >>> y = layer(jax.numpy.ones((4, 3)))  # Training mode: updates mean/var.
  >>> layer.eval()
  >>> layer.use_running_average
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jbn.core import normalization

__all__ = ["BatchNorm"]

Array = jax.Array
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNorm(nnx.Module):
    """BatchNorm with the arguments, defaults and variables of ``flax.nnx.BatchNorm``.

    Normalization runs through :func:`jbn.batch_norm` (a variance from the
    deviations from the batch mean, accurate when ``|mean| >> std``,
    closed-form backward pass, masks, named axes); the running statistics stay
    float32. Runs under ``jax_numpy_rank_promotion="raise"`` and
    ``jax_numpy_dtype_promotion="strict"``; complex inputs raise a ``TypeError``
    (``flax.nnx.BatchNorm`` normalizes them, but casts the complex batch mean
    into its float32 running mean, dropping the imaginary part with a warning;
    jbn's maths is for real inputs).

    Args:
      num_features: Number of input features.
      use_running_average: Normalize with the running statistics (eval mode).
      axis: Feature axis or axes.
      momentum: Decay of the running statistics (Flax convention), or ``None``
        for a cumulative average (needs ``track_count=True``).
      epsilon: Added to the variance.
      dtype: Output dtype (default: inferred by ``promote_dtype``).
      param_dtype: Dtype of ``scale`` and ``bias``.
      use_bias: Add a learned bias.
      use_scale: Multiply by a learned scale.
      bias_init: Initializer of the bias.
      scale_init: Initializer of the scale.
      axis_name: Mapped axis name(s) whose devices share statistics.
      axis_index_groups: Groups of indices within ``axis_name``.
      use_fast_variance: Accepted for compatibility (the variance is always
        the accurate one of `jbn.core.statistics`).
      promote_dtype: ``promote_dtype((x, mean, var, scale, bias), dtype=...)``
        as in ``flax.nnx.BatchNorm``; decides the computation/output dtype.
      rngs: Random number generators for the initializers.
      bias_metadata: Metadata of the bias ``nnx.Param``.
      scale_metadata: Metadata of the scale ``nnx.Param``.
      unbiased_running_var: jbn extra: store ``n / (n - 1) * var`` like PyTorch.
      track_count: jbn extra: keep ``count`` (an int32 ``nnx.BatchStat``, PyTorch's
        ``num_batches_tracked``).
      virtual_batch_size: jbn extra: Ghost BatchNorm groups along axis 0.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        unbiased_running_var: bool = False,
        track_count: bool = False,
        virtual_batch_size: int | None = None,
    ):
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if track_count else nnx.data(None)
        if use_scale:
            key = rngs.params()
            self.scale = nnx.Param(scale_init(key, feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        if use_bias:
            key = rngs.params()
            self.bias = nnx.Param(bias_init(key, feature_shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.track_count = track_count
        self.virtual_batch_size = virtual_batch_size

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``; in training also updates the ``nnx.BatchStat`` variables.

        Args:
          x: Input.
          use_running_average: Overrides the attribute of the same name.
          mask: Boolean array broadcastable to ``x``: the elements that count.

        Returns:
          The normalized input.

        Raises:
          ValueError: If ``use_running_average`` is ``None`` both here and on the module.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "No `use_running_average` argument was provided to BatchNorm: pass it to "
                "the constructor or the call, or use model.train() / model.eval()."
            )
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # Same dtype rules as flax.nnx.BatchNorm (standard promotion, also when
        # jax_numpy_dtype_promotion="strict" is set); the statistics stay float32.
        with jax.numpy_dtype_promotion("standard"):
            x, _, _, scale, bias = self.promote_dtype(
                (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
            )
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        stats = {"mean": self.mean[...], "var": self.var[...]}
        if self.count is not None:
            stats["count"] = self.count[...]
        y, new_stats = normalization.batch_norm(
            x,
            params or None,
            stats,
            training=not use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            unbiased_running_var=self.unbiased_running_var,
            virtual_batch_size=self.virtual_batch_size,
        )
        if not use_running_average:
            self.mean[...] = new_stats["mean"]
            self.var[...] = new_stats["var"]
            if self.count is not None:
                self.count[...] = new_stats["count"]
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
