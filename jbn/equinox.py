"""``jbn.equinox.BatchNorm``: an Equinox drop-in over the functional core.

Same constructor, calling convention and state layout as
``equinox.nn.BatchNorm(mode="batch")``: it is called on one example of shape
``(input_size, *spatial)`` under ``jax.vmap(..., axis_name=...)``, keeps its
running statistics in an ``eqx.nn.State`` made by ``eqx.nn.make_with_state``,
and follows ``eqx.nn.inference_mode``. Its state has the same layout and values
(``batch_counter``, ``batch_state_index = (mean, var)``: same indices, shapes
and updates), so a state and a serialised model move both ways between the two
layers; what inference does with the state differs (below).

The maths is :func:`jbn.core.normalization.batch_norm` over the vmapped axis:
statistics accumulated in float32 or wider whatever the input dtype, masks,
``momentum=None`` for a cumulative average and PyTorch's unbiased running
variance as options. Two deliberate differences from Equinox:

- Inference uses the running statistics as they are (Flax, PyTorch, Haiku).
  Equinox divides both by ``1 - momentum ** steps``; its running variance
  starts at 1, so that division inflates the inference variance by
  ``momentum ** steps / (1 - momentum ** steps)`` (99 after one step at the
  default momentum 0.99) until the running average has forgotten its start.
  The two agree before the first step and once ``momentum ** steps`` is
  negligible.
- The running statistics are float32 (or wider) for a low-precision ``dtype``,
  and the output keeps the input's dtype.

Import it as ``import jbn.equinox`` (it needs the optional ``equinox`` extra:
``pip install -e ".[equinox]"``).

Example:
  >>> import equinox as eqx
  >>> import jax
  >>> import jbn.equinox
  >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, axis_name="batch")
  >>> batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  >>> y, state = batched(jax.numpy.ones((4, 3, 5, 5)), state)  # Training: updates state.
  >>> y.shape
  (4, 3, 5, 5)
  >>> y, _ = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None))(
  ...     jax.numpy.ones((4, 3, 5, 5)), state)  # Running statistics, no axis name needed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from jbn.core import normalization, statistics, validation

__all__ = ["BatchNorm"]

Array = jax.Array


def _default_floating_dtype() -> Any:
    """float64 when JAX runs in 64-bit mode, else float32 (Equinox's default)."""
    return jnp.zeros(()).dtype


class BatchNorm(eqx.nn.StatefulLayer):
    """BatchNorm with the arguments, call and state of ``equinox.nn.BatchNorm(mode="batch")``.

    Normalizes each channel (axis 0 of one example) with the mean and biased
    variance over the spatial axes and over the vmapped batch axis
    ``axis_name``, then applies ``weight`` and ``bias``. In training it also
    moves the running statistics ``new = momentum * old + (1 - momentum) * batch``
    and counts the steps; in inference mode it normalizes with the running
    statistics and leaves the state unchanged.

    Args:
      input_size: Number of channels ``C``; each example has shape ``(C, *spatial)``.
      axis_name: Name of the mapped batch axis (``jax.vmap``, ``pmap`` or
        ``shard_map``) whose examples share statistics, or a tuple of names
        (as Equinox takes): statistics over all of them, nested ``jax.vmap``
        axes included.
      eps: Added to the variance; positive and finite.
      channelwise_affine: Learn a per-channel ``weight`` and ``bias``.
      momentum: Decay of the running statistics in ``[0, 1]`` (Flax and
        Equinox convention), or ``None`` for the cumulative average of all
        training steps (PyTorch's ``momentum=None``).
      inference: Normalize with the running statistics (toggle with
        ``eqx.nn.inference_mode``, or override per call).
      dtype: Dtype of ``weight`` and ``bias`` (default: float32, float64 in
        64-bit mode); the running statistics use it or float32, whichever is wider.
      mode: Only ``"batch"`` (Equinox's ``"ema"`` mode normalizes with running
        statistics during training, which jbn does not do).
      unbiased_running_var: jbn extra: store ``n / (n - 1) * var`` like PyTorch.

    Raises:
      ValueError: On a bad ``mode``, ``input_size``, ``eps`` or ``momentum``.
    """

    weight: Array | None
    bias: Array | None
    batch_counter: eqx.nn.StateIndex
    batch_state_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: Literal["batch"] = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: Literal["batch"] = "batch",
        *,
        unbiased_running_var: bool = False,
    ):
        if mode != "batch":
            raise ValueError(
                f"jbn.equinox.BatchNorm implements mode='batch' only, got mode={mode!r}: "
                "Equinox's 'ema' mode normalizes with running statistics in training."
            )
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        validation.check_hyperparameters(momentum, eps)
        dtype = _default_floating_dtype() if dtype is None else jnp.dtype(dtype)
        stats_dtype = statistics.stats_dtype(dtype)
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        # jnp.array(0), as Equinox: the same (weakly typed) int, so states swap.
        self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
        self.batch_state_index = eqx.nn.StateIndex(
            (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
        )
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.unbiased_running_var = unbiased_running_var

    def __call__(
        self,
        x: Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Normalizes one example; in training also updates the running statistics.

        Args:
          x: One example, shape ``(input_size, *spatial)``, floating point.
          state: The ``eqx.nn.State`` holding the running statistics.
          key: Ignored (Equinox's layer API).
          inference: Overrides ``self.inference`` when not ``None``.
          mask: jbn extra: boolean, broadcastable to ``x``, the elements that
            count in the statistics (e.g. ``False`` for a padding example).

        Returns:
          ``(y, state)``: ``y`` shaped and typed like ``x``, and the new state.

        Raises:
          NameError: In training, when no mapped axis called ``axis_name`` is
            around the call.
          ValueError: If ``x`` is not one example of ``input_size`` channels,
            or ``mask`` does not broadcast to it.
          TypeError: If ``x`` is not floating point.
        """
        del key
        if inference is None:
            inference = self.inference
        x = jnp.asarray(x)
        self._check_example(x)
        if not inference:
            self._check_axis_name()
        mean, var = state.get(self.batch_state_index)
        counter = state.get(self.batch_counter)
        stats = {"mean": mean, "var": var, "count": counter}
        params = {"scale": self.weight, "bias": self.bias} if self.channelwise_affine else None
        with jax.named_scope("jbn.equinox.BatchNorm"):
            y, new_stats = normalization.batch_norm(
                x,
                params,
                stats,
                training=not inference,
                momentum=self.momentum,
                epsilon=self.eps,
                axis=0,
                axis_name=None if inference else self.axis_name,
                mask=mask,
                unbiased_running_var=self.unbiased_running_var,
            )
        if not inference:
            state = state.set(self.batch_counter, counter + 1)  # Keeps its weak type.
            state = state.set(self.batch_state_index, (new_stats["mean"], new_stats["var"]))
        return y, state

    def _check_example(self, x: Array) -> None:
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise ValueError(
                f"jbn.equinox.BatchNorm(input_size={self.input_size}) expects one example "
                f"of shape ({self.input_size}, ...), channels first, and is called per "
                f"example under jax.vmap; got an input of shape {x.shape}"
            )

    def _check_axis_name(self) -> None:
        try:
            lax.axis_size(self.axis_name)
        except NameError as error:
            raise NameError(
                f"jbn.equinox.BatchNorm(axis_name={self.axis_name!r}) computes the batch "
                f"statistics over the mapped axis {self.axis_name!r}: call it per example "
                f"under jax.vmap(..., axis_name={self.axis_name!r}) (or pmap/shard_map "
                f"with that axis name), or in inference mode ({error})"
            ) from None
