"""The lines a run prints first: the model, its size, and the devices it runs on.

Counting reads only shapes, so it works as well on the ``jax.ShapeDtypeStruct``
trees of ``jax.eval_shape(model.init, ...)`` as on the initialised state, and
costs no compilation either way.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> shapes = jax.eval_shape(nn.Dense(3).init, jax.random.key(0), jnp.ones((1, 4)))
  >>> count_elements(shapes["params"])
  15
"""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
from jax.sharding import Mesh

__all__ = ["count_bytes", "count_elements", "describe"]


def count_elements(tree: Any) -> int:
    """Number of scalars in the arrays (or ``ShapeDtypeStruct`` leaves) of ``tree``."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def count_bytes(tree: Any) -> int:
    """Bytes the arrays (or ``ShapeDtypeStruct`` leaves) of ``tree`` occupy, one copy."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _model_name(model_config: Any) -> str:
    details = []
    if "widths" in model_config:
        details.append(f"widths={tuple(model_config.widths)}")
    if not model_config.get("use_batch_norm", True):
        details.append("no BatchNorm")
    elif "norm" in model_config:
        details.append(f"norm={model_config.norm}")
    return f"{model_config.name} ({', '.join(details)})" if details else str(model_config.name)


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024**2:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / 1024**2:.1f} MiB"


def describe(model_config: Any, params: Any, batch_stats: Any, mesh: Mesh) -> str:
    """Two lines: the model with its parameter count, and the devices.

    Args:
      model_config: ``config.model`` (``name``; ``widths``, ``norm`` and
        ``use_batch_norm`` when present).
      params: The parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      batch_stats: The BatchNorm statistics tree (``{}`` without BatchNorm).
      mesh: The device mesh the run trains on.

    Returns:
      E.g. ``"Model: SmallBNConvNet (widths=(16, 32), norm=jbn): 23,466
      parameters (91.7 KiB), 96 BatchNorm statistics"`` and ``"Devices: 8 x cpu
      in 1 process, mesh data=8"``, joined by a newline.
    """
    num_stats = count_elements(batch_stats)
    stats = f", {num_stats:,} BatchNorm statistics" if num_stats else ""
    model = (
        f"Model: {_model_name(model_config)}: {count_elements(params):,} parameters "
        f"({_size(count_bytes(params))}){stats}"
    )
    kinds = collections.Counter(device.device_kind for device in mesh.devices.flat)
    devices = ", ".join(f"{count} x {kind}" for kind, count in kinds.items())
    processes = jax.process_count()
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    plural = "es" if processes > 1 else ""
    return f"{model}\nDevices: {devices} in {processes} process{plural}, mesh {axes}"
