"""Batch Renormalization (Ioffe 2017): the functional form and the clip schedule.

In training, with batch moments ``mu_B, sigma_B`` and running ``mu, sigma``
(``sigma = sqrt(var + epsilon)``)::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = scale * (x_hat * r + d) + bias,   x_hat = (x - mu_B) / sigma_B

so the output is a function of the running statistics, yet gradients flow
through the batch statistics as in BatchNorm, with ``r`` and ``d`` constants.
This is built on the public core: ``r`` and ``d`` come from :func:`jbn.moments`
under ``stop_gradient``, then :func:`jbn.batch_norm` runs with the effective
parameters ``{scale: scale * r, bias: scale * d + bias}``; its closed-form
derivative treats them as constants, as the paper prescribes. (This costs one
extra reduction pass over ``x`` for the moments.) With ``r_max=1, d_max=0`` it
is exactly BatchNorm. Inference uses the running statistics like BatchNorm.

Running statistics: the same ``mean``/``var`` exponential moving averages as
:func:`jbn.batch_norm` (the paper averages ``sigma`` rather than ``var``; keeping
``var`` keeps the checkpoints, folding, recalibration and interop of BatchNorm).

Example:
  >>> import jax.numpy as jnp
  >>> import jbn
  >>> from jbn.core.renorm import batch_renorm
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> y, stats = batch_renorm(x, jbn.init_params(2), jbn.init_batch_stats(2),
  ...                         training=True, r_max=1.0, d_max=0.0)
  >>> y.shape
  (4, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn.core import normalization, validation

__all__ = ["batch_renorm", "renorm_clip_schedule", "renorm_corrections"]

Array = jax.Array
ClipSchedule = Callable[[Array], tuple[Array, Array]]


def _check_clips(r_max: Any, d_max: Any) -> None:
    if isinstance(r_max, (int, float)) and not r_max >= 1:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    if isinstance(d_max, (int, float)) and not d_max >= 0:
        raise ValueError(f"d_max must be >= 0, got {d_max}")


def renorm_corrections(
    batch: normalization.Moments,
    stats: normalization.BatchStats,
    *,
    r_max: float | Array,
    d_max: float | Array,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Returns Batch Renorm's ``(r, d)`` for these batch moments, under ``stop_gradient``.

    Args:
      batch: Batch moments (:func:`jbn.moments`).
      stats: Running ``{"mean", "var"}``.
      r_max: Clip of ``r`` to ``[1 / r_max, r_max]``.
      d_max: Clip of ``d`` to ``[-d_max, d_max]``.
      epsilon: Added to both variances.
    """
    batch_sigma = jnp.sqrt(batch.var + epsilon)
    running_sigma = jnp.sqrt(stats["var"].astype(batch.var.dtype) + epsilon)
    running_mean = stats["mean"].astype(batch.mean.dtype)
    r = jnp.clip(batch_sigma / running_sigma, 1 / r_max, r_max)
    d = jnp.clip((batch.mean - running_mean) / running_sigma, -d_max, d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def batch_renorm(
    x: Array,
    params: normalization.Params | None,
    stats: normalization.BatchStats,
    *,
    training: bool,
    r_max: float | Array,
    d_max: float | Array,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis: normalization.Axes = -1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    unbiased_running_var: bool = False,
    dtype: Any = None,
) -> tuple[Array, dict[str, Array]]:
    """Batch Renormalization, returning the output and the new running statistics.

    Args:
      x: Input; features along ``axis``.
      params: ``{"scale", "bias"}`` (either may be absent) or ``None``.
      stats: Running ``{"mean", "var"}`` (+ ``"count"``).
      training: Renormalize with batch statistics and update ``stats`` (True),
        or normalize with ``stats`` (False).
      r_max: ``r`` is clipped to ``[1 / r_max, r_max]``; ``>= 1`` (may be traced).
      d_max: ``d`` is clipped to ``[-d_max, d_max]``; ``>= 0`` (may be traced).
      momentum: Decay of the running statistics (Flax convention).
      epsilon: Added to the variances.
      axis: Feature axis or axes.
      axis_name: Mapped axis name(s) whose devices share statistics.
      axis_index_groups: Groups of indices within ``axis_name``.
      mask: Boolean array broadcastable to ``x``: the elements that count.
      unbiased_running_var: Store the unbiased variance (PyTorch convention).
      dtype: Output dtype (default: ``x.dtype``).

    Returns:
      ``(y, new_stats)``.

    Raises:
      ValueError: If ``r_max < 1`` or ``d_max < 0`` (when given as numbers), or
        on the errors of :func:`jbn.batch_norm`.
    """
    _check_clips(r_max, d_max)
    x = jnp.asarray(x)
    kwargs = dict(
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        dtype=dtype,
    )
    if not training:
        return normalization.batch_norm(x, params, stats, training=False, **kwargs)
    feature_axes = validation.canonical_axes(x.ndim, axis)
    batch = normalization.moments(
        lax.stop_gradient(x),
        axis=feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    r, d = renorm_corrections(batch, stats, r_max=r_max, d_max=d_max, epsilon=epsilon)
    # In the statistics' dtype, explicitly (also under jax_numpy_dtype_promotion="strict").
    params = {k: v.astype(r.dtype) for k, v in (params or {}).items() if v is not None}
    scale = params.get("scale")
    scale = r if scale is None else scale * r
    bias = d if params.get("scale") is None else params["scale"] * d
    if params.get("bias") is not None:
        bias = bias + params["bias"]
    return normalization.batch_norm(
        x, {"scale": scale, "bias": bias}, stats, training=True, **kwargs
    )


def renorm_clip_schedule(
    step: int | Array,
    *,
    warmup_steps: int,
    ramp_steps: int,
    r_max_final: float = 3.0,
    d_max_final: float = 5.0,
    d_ramp_steps: int | None = None,
) -> tuple[Array, Array]:
    """The paper's clip schedule: BatchNorm during warm-up, then linear ramps.

    ``r_max`` is 1 and ``d_max`` 0 (plain BatchNorm) for ``step <=
    warmup_steps``, then both grow linearly to ``r_max_final`` and
    ``d_max_final`` over ``ramp_steps`` steps (``d_ramp_steps`` for ``d_max``
    when given; the paper used 5k warm-up, 40k and 25k ramp steps).

    Args:
      step: Training step (int or traced array).
      warmup_steps: Steps of plain BatchNorm.
      ramp_steps: Steps over which ``r_max`` grows from 1 to ``r_max_final``.
      r_max_final: Final ``r_max``.
      d_max_final: Final ``d_max``.
      d_ramp_steps: Steps over which ``d_max`` grows (default: ``ramp_steps``).

    Returns:
      ``(r_max, d_max)`` as float32 scalars.
    """

    def progress(steps: int) -> Array:
        elapsed = jnp.asarray(step, jnp.float32) - warmup_steps
        if steps <= 0:
            return (elapsed >= 0).astype(jnp.float32)
        return jnp.clip(elapsed / steps, 0.0, 1.0)

    d_steps = ramp_steps if d_ramp_steps is None else d_ramp_steps
    r_max = 1.0 + (r_max_final - 1.0) * progress(ramp_steps)
    d_max = d_max_final * progress(d_steps)
    return r_max, d_max
