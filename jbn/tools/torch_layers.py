"""One PyTorch layer at a time: BatchNorm, Conv and Linear weights <-> jbn's layouts.

The building blocks of `jbn.tools.interop_torch` (also importable from there).
Nothing here imports ``torch``: values may be torch tensors (any device, with
or without ``requires_grad``) or NumPy arrays, read with `to_numpy`.

* ``BatchNorm{1,2,3}d``: ``weight -> params/scale``, ``bias -> params/bias``,
  ``running_mean -> batch_stats/mean``, ``running_var -> batch_stats/var``,
  ``num_batches_tracked -> batch_stats/count`` (optional). PyTorch stores the
  *unbiased* running variance and ``momentum=0.1`` means
  ``new = 0.9 * old + 0.1 * batch``: the equivalent jbn layer is
  ``jbn.BatchNorm(momentum=0.9, unbiased_running_var=True, track_count=True)``.
* ``Conv{1,2,3}d``: ``weight`` ``(O, I, *window)`` -> ``kernel`` ``(*window, I, O)``.
* ``Linear``: ``weight`` ``(out, in)`` -> ``kernel`` ``(in, out)``.
* Flatten before the first ``Linear``: PyTorch flattens ``(C, H, W)``, an NHWC
  model flattens ``(H, W, C)``; the rows of the Dense kernel are permuted
  accordingly (:func:`dense_from_torch_after_flatten`).

Example:
  >>> import numpy as np
  >>> from jbn.tools import torch_layers
  >>> w = np.arange(6.0, dtype=np.float32).reshape(2, 3)  # Linear(3, 2).weight
  >>> torch_layers.dense_from_torch(w, None)["kernel"].shape
  (3, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "conv_from_torch",
    "conv_to_torch",
    "dense_from_torch",
    "dense_from_torch_after_flatten",
    "dense_to_torch",
    "dense_to_torch_before_flatten",
    "to_numpy",
]

StateDict = Mapping[str, Any]


def to_numpy(value: Any) -> np.ndarray:
    """Returns a ``torch.Tensor``, JAX or NumPy array as a NumPy array.

    Tensors are detached and moved to the CPU first (duck-typed: no torch import).
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
    return np.asarray(value)


def _export(value: Any) -> np.ndarray:
    """A writable NumPy copy (JAX arrays give read-only views, which torch warns about)."""
    return np.array(to_numpy(value), copy=True)


def _float(value: Any, dtype: Any) -> jnp.ndarray:
    return jnp.asarray(to_numpy(value).astype(dtype))


def batch_norm_from_torch(
    state_dict: StateDict, prefix: str = "", *, dtype: Any = np.float32, with_count: bool = False
) -> tuple[dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
    """Converts one PyTorch ``BatchNorm`` layer to jbn ``(params, batch_stats)``.

    Args:
      state_dict: PyTorch state dict (tensors or arrays).
      prefix: Key prefix of the layer, e.g. ``"bn1."``.
      dtype: Dtype of the returned floating-point arrays.
      with_count: Also return ``batch_stats["count"]`` (int32) from
        ``num_batches_tracked`` (needed by ``track_count=True`` layers).

    Returns:
      ``({"scale", "bias"}, {"mean", "var"[, "count"]})``; ``params`` is empty
      for ``affine=False`` layers.

    Raises:
      KeyError: If the running statistics (or the count, when asked) are missing.
    """
    params = {}
    if prefix + "weight" in state_dict:
        params["scale"] = _float(state_dict[prefix + "weight"], dtype)
    if prefix + "bias" in state_dict:
        params["bias"] = _float(state_dict[prefix + "bias"], dtype)
    stats = {
        "mean": _float(state_dict[prefix + "running_mean"], np.float32),
        "var": _float(state_dict[prefix + "running_var"], np.float32),
    }
    if with_count:
        count = to_numpy(state_dict[prefix + "num_batches_tracked"])
        stats["count"] = jnp.asarray(count.astype(np.int32).reshape(()))
    return params, stats


def batch_norm_to_torch(
    params: Mapping[str, Any] | None, stats: Mapping[str, Any], prefix: str = ""
) -> dict[str, np.ndarray]:
    """Converts jbn BatchNorm ``(params, batch_stats)`` to PyTorch keys.

    ``num_batches_tracked`` is ``stats["count"]`` as int64, or 0 when the
    layer did not track its count.
    """
    out = {}
    if params:
        if "scale" in params:
            out[prefix + "weight"] = _export(params["scale"])
        if "bias" in params:
            out[prefix + "bias"] = _export(params["bias"])
    out[prefix + "running_mean"] = _export(stats["mean"])
    out[prefix + "running_var"] = _export(stats["var"])
    count = to_numpy(stats["count"]) if "count" in stats else np.zeros((), np.int64)
    out[prefix + "num_batches_tracked"] = count.astype(np.int64).reshape(())
    return out


def conv_from_torch(
    weight: Any, bias: Any | None = None, *, dtype: Any = np.float32
) -> dict[str, jnp.ndarray]:
    """Converts a PyTorch ``Conv{1,2,3}d`` ``(O, I, *window)`` weight to ``{"kernel"[, "bias"]}``.

    The kernel is ``(*window, I, O)``, the layout of ``flax.linen.Conv``.
    """
    w = to_numpy(weight)
    out = {"kernel": jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2)).astype(dtype))}
    if bias is not None:
        out["bias"] = _float(bias, dtype)
    return out


def conv_to_torch(kernel: Any) -> np.ndarray:
    """Converts a ``(*window, I, O)`` kernel to PyTorch's ``(O, I, *window)``."""
    return _export(np.moveaxis(to_numpy(kernel), (-1, -2), (0, 1)))


def dense_from_torch(
    weight: Any, bias: Any | None = None, *, dtype: Any = np.float32
) -> dict[str, jnp.ndarray]:
    """Converts a PyTorch ``Linear`` ``(out, in)`` weight to ``{"kernel": (in, out)[, "bias"]}``."""
    out = {"kernel": jnp.asarray(to_numpy(weight).T.astype(dtype))}
    if bias is not None:
        out["bias"] = _float(bias, dtype)
    return out


def dense_to_torch(kernel: Any) -> np.ndarray:
    """Converts an ``(in, out)`` Dense kernel to PyTorch's ``(out, in)`` weight."""
    return _export(to_numpy(kernel).T)


def dense_from_torch_after_flatten(
    weight: Any,
    bias: Any | None,
    chw_shape: tuple[int, int, int],
    *,
    dtype: Any = np.float32,
) -> dict[str, jnp.ndarray]:
    """Converts the first ``Linear`` after a ``Flatten`` of NCHW features for an NHWC model.

    PyTorch's input index is ``c * H * W + h * W + w``; the NHWC model's is
    ``(h * W + w) * C + c``. The rows of the kernel are permuted to match.

    Args:
      weight: ``(out, C * H * W)`` PyTorch weight.
      bias: ``(out,)`` or ``None``.
      chw_shape: ``(C, H, W)`` of the flattened feature map.
      dtype: Dtype of the result.

    Returns:
      ``{"kernel": (H * W * C, out)[, "bias"]}``.

    Raises:
      ValueError: If ``weight`` does not have ``C * H * W`` inputs.
    """
    w = to_numpy(weight)
    c, h, wd = chw_shape
    if w.ndim != 2 or w.shape[1] != c * h * wd:
        raise ValueError(
            f"Linear weight of shape {w.shape} does not take C*H*W={c * h * wd} inputs"
        )
    kernel = w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, w.shape[0])
    out = {"kernel": jnp.asarray(kernel.astype(dtype))}
    if bias is not None:
        out["bias"] = _float(bias, dtype)
    return out


def dense_to_torch_before_flatten(kernel: Any, chw_shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`dense_from_torch_after_flatten` for the kernel: ``(out, C * H * W)``."""
    k = to_numpy(kernel)
    c, h, w = chw_shape
    out = k.reshape(h, w, c, k.shape[1]).transpose(3, 2, 0, 1).reshape(k.shape[1], c * h * w)
    return _export(out)
