"""Recalibrate BatchNorm running statistics from data, weights fixed (PreciseBN).

The exponential moving average of training lags behind the weights, and after
weight averaging (SWA, EMA of weights) or pruning it describes no network at
all. PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021) replaces
it by population statistics: run the model in training mode over a few batches
with the weights fixed, record every BatchNorm layer's batch moments, and
aggregate them exactly, count-weighted, instead of with an EMA:

* ``mean = sum_i n_i mu_i / N``, the mean of all the data seen;
* ``var`` (``variance="population"``, the default, the paper's choice)
  ``= sum_i n_i (var_i + (mu_i - mean)^2) / N``, the variance of all the data
  pooled, as if it had been one batch; or (``variance="batch_average"``,
  detectron2's ``update_bn_stats``) ``sum_i n_i var_i / N``, the expected
  within-batch variance, which is what the training-mode normalization used.

Layers are found with ``flax.linen.intercept_methods``: every ``__call__`` of
a ``jbn.BatchNorm``, ``jbn.BatchRenorm`` or ``flax.linen.BatchNorm`` (or of
any module accepted by ``is_norm``) records the moments of its input over all
but its ``axis``, honouring ``mask``. Each layer must be called once per apply.
Layers with ``unbiased_running_var=True`` get ``N / (N - 1) * var``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jbn.models import SmallBNConvNet
  >>> from jbn.tools.recalibration import recalibrate_batch_stats
  >>> model = SmallBNConvNet(widths=(4,))
  >>> x = jnp.ones((2, 8, 8, 3))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> apply_fn = lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])
  >>> new = recalibrate_batch_stats(apply_fn, variables, [x, 2 * x])
  >>> sorted(new["batch_stats"]["bn0"])
  ['mean', 'var']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbn.core import normalization
from jbn.linen import BatchNorm, BatchRenorm

__all__ = ["batch_norm_moments", "is_batch_norm", "recalibrate_batch_stats"]

Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, Any], Any]


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a ``jbn.BatchNorm``, ``jbn.BatchRenorm`` or ``flax.linen.BatchNorm``."""
    return isinstance(module, (BatchNorm, BatchRenorm, nn.BatchNorm))


def batch_norm_moments(
    apply_fn: ApplyFn,
    variables: Variables,
    batch: Any,
    *,
    is_norm: Callable[[nn.Module], bool] | None = None,
) -> dict[tuple[str, ...], normalization.Moments]:
    """Runs ``apply_fn(variables, batch)`` and returns each norm layer's input moments.

    Args:
      apply_fn: Runs the model, e.g. ``lambda v, x: model.apply(v, x,
        train=True, mutable=["batch_stats"])``; its output is discarded.
      variables: The model variables.
      batch: Whatever ``apply_fn`` takes as its second argument.
      is_norm: Which modules count as BatchNorm layers (default: ``jbn.BatchNorm``,
        ``jbn.BatchRenorm``, ``flax.linen.BatchNorm``).

    Returns:
      ``{module path: Moments(mean, var, count)}``; ``count`` is per feature.

    Raises:
      ValueError: If a layer is called more than once.
    """
    is_norm = is_norm or is_batch_norm
    recorded: dict[tuple[str, ...], normalization.Moments] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and is_norm(module) and not module.is_initializing():
            path = tuple(module.path)
            if path in recorded:
                raise ValueError(f"BatchNorm layer {'/'.join(path)} is called more than once")
            recorded[path] = normalization.moments(
                jax.lax.stop_gradient(args[0]), axis=module.axis, mask=kwargs.get("mask")
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(variables, batch)
    return recorded


def recalibrate_batch_stats(
    apply_fn: ApplyFn,
    variables: Variables,
    batches: Iterable[Any],
    *,
    variance: Literal["population", "batch_average"] = "population",
    is_norm: Callable[[nn.Module], bool] | None = None,
) -> dict[str, Any]:
    """Re-estimates every BatchNorm layer's running statistics from ``batches``.

    The weights are fixed; only ``batch_stats/*/mean`` and ``var`` change
    (``count`` and everything else are kept). Moments are accumulated on the
    host in float64 and stored in the dtype of the old statistics.

    Args:
      apply_fn: Runs the model in training mode, e.g. ``lambda v, x:
        model.apply(v, x, train=True, mutable=["batch_stats"])`` (PreciseBN:
        each layer sees the batch-normalized outputs of the layers before it).
        It is jitted here; its output is discarded.
      variables: ``{"params", "batch_stats", ...}``.
      batches: Iterable of inputs to ``apply_fn`` (e.g. 10-200 batches of images).
      variance: ``"population"`` (variance of all the data pooled) or
        ``"batch_average"`` (count-weighted average of the batch variances).
      is_norm: Which modules count as BatchNorm layers (see :func:`batch_norm_moments`).

    Returns:
      New variables with recalibrated ``batch_stats``.

    Raises:
      ValueError: If ``batches`` is empty, ``variance`` unknown, or a layer has
        no ``batch_stats`` entry.
    """
    if variance not in ("population", "batch_average"):
        raise ValueError(f"variance must be 'population' or 'batch_average', got {variance!r}")
    unbiased: dict[tuple[str, ...], bool] = {}

    def moments_and_flags(variables, batch):
        def flagging(module: nn.Module) -> bool:
            hit = (is_norm or is_batch_norm)(module)
            if hit:
                unbiased[tuple(module.path)] = getattr(module, "unbiased_running_var", False)
            return hit

        return batch_norm_moments(apply_fn, variables, batch, is_norm=flagging)

    step = jax.jit(moments_and_flags)
    per_layer: dict[tuple[str, ...], list[tuple[np.ndarray, ...]]] = {}
    for batch in batches:
        for path, m in step(variables, batch).items():
            arrays = tuple(np.asarray(a, np.float64) for a in m)
            per_layer.setdefault(path, []).append(arrays)
    if not per_layer:
        raise ValueError("no batches (or no BatchNorm layer ran): nothing to recalibrate")

    batch_stats = _unfreeze(variables["batch_stats"])
    for path, moments in per_layer.items():
        means, variances, counts = (np.stack(s) for s in zip(*moments, strict=True))
        total = counts.sum(0)
        weights = counts / np.maximum(total, 1)
        mean = (weights * means).sum(0)
        var = (weights * variances).sum(0)
        if variance == "population":
            var = var + (weights * np.square(means - mean)).sum(0)
        if unbiased.get(path, False):
            var = var * total / np.maximum(total - 1, 1)
        layer = batch_stats  # A fresh copy (_unfreeze): updated in place.
        try:
            for key in path:
                layer = layer[key]
        except KeyError as e:
            raise ValueError(f"no batch_stats for BatchNorm layer {'/'.join(path)}") from e
        layer["mean"] = jnp.asarray(mean, layer["mean"].dtype)
        layer["var"] = jnp.asarray(var, layer["var"].dtype)
    return {**variables, "batch_stats": batch_stats}


def _unfreeze(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
