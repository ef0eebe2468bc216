"""PyTorch interop: a PyTorch ``state_dict`` <-> jbn variables, for any conv/linear/BN network.

`from_torch` fills a variable tree made by ``model.init`` (or
``jax.eval_shape`` of it: only shapes and dtypes are read) from a PyTorch
``state_dict``; `to_torch` writes jbn variables under the keys of a template
state dict (``torch_model.state_dict()``), in its order, shapes and dtypes,
so ``load_state_dict(strict=True)`` accepts the result (after
``torch.from_numpy``). Nothing here imports ``torch``: state dicts may hold
torch tensors or NumPy arrays.

How layers are paired (`jbn.tools.torch_pairing`): by kind (convolution,
dense, norm), then by name when that kind's names correspond one to one
(``layer1.0.downsample.0`` <-> ``layer1_0/downsample_0``, as in `jbn.models`'
ResNets), otherwise in order: PyTorch's registration order against jbn's module
paths in natural order (``conv2`` before ``conv10``), which is the creation
order for flax's automatic names (``Conv_0``, ``Conv_1``, ...) and for
`jbn.models`. So the seed notebook's ``Sequential`` (``block1.0``,
``block1.1``, ``head.1``), the ``conv1``/``bn1``/``fc`` variant and
torchvision's ResNets all map onto `jbn.models`. Every shape is checked; a
missing, unexpected or mis-shaped key raises a ``ValueError`` that names it.

What the state dict's key order must be (`jbn.tools.torch_order`): PyTorch's
own (``torch_model.state_dict()``), or any other order (sorted keys, a
safetensors file's order by dtype then name) when the keys still tell the
registration order of layers of equal shape that do not pair by name: numbered
modules (``Sequential``, ``ModuleList``) count in numeric order, but named
siblings (``fc1``, ``fc2``) come in an unknown order. Layers of different
shapes then pair by shape, and the convolutions are taken to come before the
dense layers (the first of which reads the flattened map); two layers of equal
shape in an unknown order raise an "ambiguous key order" ``ValueError``.

Layouts (`jbn.tools.torch_layers`): Conv ``(O, I, *window)`` <-> kernel
``(*window, I, O)``; Linear ``(out, in)`` <-> ``(in, out)``; BatchNorm
``weight``/``bias``/``running_mean``/``running_var``/``num_batches_tracked``
<-> ``scale``/``bias``/``mean``/``var``/``count`` (``num_batches_tracked`` is
read only when the jbn layer keeps a ``count``, and written as 0 when it does
not). The first Linear after convolutions whose input is larger than their
channels follows a flatten: its rows are permuted from PyTorch's ``(C, H, W)``
order to NHWC's ``(H, W, C)`` (the map is taken as square unless
``spatial_shape`` says otherwise). To continue training a PyTorch network
alike, build the jbn model with PyTorch's conventions:
``jbn.BatchNorm(momentum=0.9, unbiased_running_var=True, track_count=True)``.

Example:
  >>> import functools, jax, jax.numpy as jnp, numpy as np
  >>> from jbn import interop_torch
  >>> from jbn.models import SmallBNConvNet
  >>> init = functools.partial(SmallBNConvNet(widths=(4,)).init, train=False)
  >>> variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  >>> state_dict = {  # A PyTorch Sequential(Conv2d, BatchNorm2d, ..., Linear) as NumPy.
  ...     "0.weight": np.ones((4, 3, 3, 3), np.float32),
  ...     "1.weight": np.ones(4, np.float32), "1.bias": np.zeros(4, np.float32),
  ...     "1.running_mean": np.zeros(4, np.float32), "1.running_var": np.ones(4, np.float32),
  ...     "1.num_batches_tracked": np.zeros((), np.int64),
  ...     "5.weight": np.ones((10, 64), np.float32), "5.bias": np.zeros(10, np.float32)}
  >>> variables = interop_torch.from_torch(state_dict, variables)
  >>> variables["params"]["conv0"]["kernel"].shape
  (3, 3, 3, 4)
  >>> list(interop_torch.to_torch(variables, state_dict)) == list(state_dict)
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jbn.tools import torch_pairing
from jbn.tools.torch_layers import (
    batch_norm_from_torch,
    batch_norm_to_torch,
    conv_from_torch,
    conv_to_torch,
    dense_from_torch,
    dense_from_torch_after_flatten,
    dense_to_torch,
    dense_to_torch_before_flatten,
    to_numpy,
)

__all__ = [
    "batch_norm_from_torch",
    "batch_norm_to_torch",
    "conv_from_torch",
    "conv_to_torch",
    "dense_from_torch",
    "dense_from_torch_after_flatten",
    "dense_to_torch",
    "dense_to_torch_before_flatten",
    "from_torch",
    "to_numpy",
    "to_torch",
]

StateDict = Mapping[str, Any]
Path = tuple[str, ...]


def _get(tree: Mapping[str, Any], where: Path) -> Any:
    for name in where:
        tree = tree[name]
    return tree


def _set(tree: dict[str, Any], where: Path, value: Any) -> None:
    for name in where[:-1]:
        tree = tree[name]
    tree[where[-1]] = value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def from_torch(
    state_dict: StateDict,
    variables: Mapping[str, Any],
    *,
    spatial_shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Fills jbn ``variables`` with the weights and running statistics of a PyTorch ``state_dict``.

    Args:
      state_dict: ``torch_model.state_dict()`` (tensors or NumPy arrays), in
        PyTorch's key order or one that tells the order of equal layers (sorted
        keys do for numbered modules, not for named siblings that do not pair
        by name; see the module docstring).
      variables: ``model.init(...)`` of the jbn model, or ``jax.eval_shape`` of
        it; only the shapes and dtypes of ``params`` and ``batch_stats`` are read.
      spatial_shape: ``(H, W)`` of the map flattened before the first Linear,
        when it is not square (ignored after global pooling).

    Returns:
      New variables: every ``params``/``batch_stats`` leaf from the state dict,
      in the dtype of ``variables``; other collections unchanged.

    Raises:
      ValueError: Naming the key when one is missing, unexpected or mis-shaped,
        the layers when the two networks do not pair up, or two layers of equal
        shape whose order the keys do not tell ("ambiguous key order").
    """
    shapes = {key: to_numpy(value).shape for key, value in state_dict.items()}
    out = _copy(dict(variables))
    for link in torch_pairing.links(shapes, variables, spatial_shape):
        template = _get(variables, link.where)
        value = link.to_jbn(to_numpy(state_dict[link.key]))
        # A copy: on the CPU, JAX may alias a NumPy view of the torch tensor's memory,
        # which a later in-place torch update (optimizer.step()) would then change.
        _set(out, link.where, jnp.asarray(np.array(value, dtype=template.dtype)))
    return out


def to_torch(
    variables: Mapping[str, Any],
    state_dict: StateDict,
    *,
    spatial_shape: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Writes jbn ``variables`` under the keys of a template PyTorch ``state_dict``.

    Args:
      variables: ``{"params", "batch_stats"}`` of the jbn model.
      state_dict: Template: ``torch_model.state_dict()`` of the target network
        (its keys, order, shapes and dtypes are used, not its values).
      spatial_shape: As in `from_torch`.

    Returns:
      ``{key: NumPy array}`` in the template's order and dtypes, which
      ``torch_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)``
      accepts. ``num_batches_tracked`` is the layer's ``count``, or 0 when the
      jbn layer keeps none.

    Raises:
      ValueError: As `from_torch`.
    """
    templates = {key: to_numpy(value) for key, value in state_dict.items()}
    links = torch_pairing.links(
        {key: t.shape for key, t in templates.items()}, variables, spatial_shape
    )
    linked = {link.key: link for link in links}
    out = {}
    for key, template in templates.items():
        if key in linked:
            value = linked[key].to_torch(np.asarray(_get(variables, linked[key].where)))
        elif key.rpartition(".")[2] == "num_batches_tracked":
            value = np.zeros((), template.dtype)
        else:  # Not reached: every other key is linked or rejected by _links.
            raise ValueError(f"unexpected key {key!r}: nothing in the jbn variables maps to it")
        out[key] = np.array(np.asarray(value).astype(template.dtype))
    return out
