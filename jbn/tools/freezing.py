"""Freeze BatchNorm for fine-tuning: running statistics used and not updated.

Two independent pieces:

* :func:`frozen_batch_norm` builds a norm-layer factory whose layers always
  normalize with their running statistics (``use_running_average=True``),
  whatever mode the model runs in. Pass it as a model's ``norm`` (e.g.
  ``SmallBNConvNet(norm=frozen_batch_norm())``) and the train step (with
  dropout etc. in training mode) leaves ``batch_stats`` bitwise unchanged,
  while gradients still reach ``scale`` and ``bias``. The variables are the
  same as with the plain factory, so checkpoints load unchanged.
* :func:`batch_norm_param_mask` / :func:`freeze_batch_norm_params` also stop
  the optimizer from updating BatchNorm's ``scale`` and ``bias`` (the layers of
  ``params`` that have a ``batch_stats`` entry at the same path).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jbn.tools.freezing import freeze_batch_norm_params, frozen_batch_norm
  >>> from jbn.models import SmallBNConvNet
  >>> model = SmallBNConvNet(widths=(4,), norm=frozen_batch_norm(momentum=0.9))
  >>> variables = model.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)), train=False)
  >>> tx = freeze_batch_norm_params(optax.sgd(0.1), variables)
  >>> opt_state = tx.init(variables["params"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import optax

from jbn.linen import BatchNorm

__all__ = ["batch_norm_param_mask", "freeze_batch_norm_params", "frozen_batch_norm"]


def frozen_batch_norm(
    norm: Callable[..., nn.Module] = BatchNorm, **kwargs: Any
) -> Callable[..., nn.Module]:
    """Returns a norm factory whose layers always use (and never update) running stats.

    Args:
      norm: The norm layer class or factory (``jbn.BatchNorm``,
        ``flax.linen.BatchNorm``, ``jbn.BatchRenorm``, a ``functools.partial``).
      **kwargs: Passed to ``norm`` (e.g. ``momentum=0.9``, ``epsilon=...``).

    Returns:
      ``factory(use_running_average=..., **more)``, ignoring ``use_running_average``.
    """

    def factory(*, use_running_average: bool | None = None, **more: Any) -> nn.Module:
        del use_running_average  # Frozen: always the running statistics.
        return norm(use_running_average=True, **kwargs, **more)

    return factory


def batch_norm_param_mask(variables: Mapping[str, Any]) -> Any:
    """Returns a pytree of bools over ``variables["params"]``: True for BatchNorm params.

    A parameter counts as BatchNorm's when its layer (its parent path) also has
    an entry in ``variables["batch_stats"]``.

    Args:
      variables: ``{"params", "batch_stats"}``.
    """
    stats = variables.get("batch_stats", {})

    def has_stats(path: tuple[Any, ...]) -> bool:
        node: Any = stats
        for entry in path[:-1]:
            if not isinstance(node, Mapping) or entry.key not in node:
                return False
            node = node[entry.key]
        return isinstance(node, Mapping) and "mean" in node

    return jax.tree_util.tree_map_with_path(
        lambda path, _: has_stats(path), dict(variables["params"])
    )


def freeze_batch_norm_params(
    optimizer: optax.GradientTransformation, variables: Mapping[str, Any]
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that BatchNorm's ``scale`` and ``bias`` get zero updates.

    Everything else is updated by ``optimizer`` (its state covers only those
    parameters, so weight decay and momentum leave the frozen ones alone).

    Args:
      optimizer: The optimizer for the other parameters.
      variables: ``{"params", "batch_stats"}`` of the model (see :func:`batch_norm_param_mask`).

    Returns:
      An ``optax.GradientTransformation`` over ``variables["params"]``.
    """
    labels = jax.tree.map(
        lambda frozen: "frozen" if frozen else "train", batch_norm_param_mask(variables)
    )
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
