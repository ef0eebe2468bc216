"""PyTorch interop: a PyTorch ``state_dict`` <-> jbn variables, for any conv/linear/BN network.

`from_torch` fills a variable tree made by ``model.init`` (or
``jax.eval_shape`` of it: only shapes and dtypes are read) from a PyTorch
``state_dict``; `to_torch` writes jbn variables under the keys of a template
state dict (``torch_model.state_dict()``), in its order, shapes and dtypes,
so ``load_state_dict(strict=True)`` accepts the result (after
``torch.from_numpy``). Nothing here imports ``torch``: state dicts may hold
torch tensors or NumPy arrays.

How layers are paired. The state dict is cut into layers by module name
(``layer1.0.conv1.weight`` -> ``layer1.0.conv1``), the variables into the
modules that hold arrays. Each is a convolution (a ``weight`` of 3+ dimensions
/ a ``kernel`` of 3+), a dense layer (2 dimensions) or a norm layer
(``running_mean``/``running_var`` / ``batch_stats``). Layers of each kind are
paired in order: PyTorch's registration order (the state dict's) with jbn's
module paths in natural order (numbers compared as numbers: ``conv2`` before
``conv10``), which is the creation order for flax's automatic names
(``Conv_0``, ``Conv_1``, ...) and for the models in `jbn.models` (whose ResNets
even carry torchvision's names). So the seed notebook's ``Sequential``
(``block1.0``, ``block1.1``, ``head.1``), a ``conv1``/``bn1``/``fc`` variant
and torchvision's ResNets all map onto `jbn.models`, whatever the names.
Every shape is checked; a missing, unexpected or mis-shaped key raises a
``ValueError`` that names it.

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
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jbn import interop_torch
  >>> from jbn.models import SmallBNConvNet
  >>> model = SmallBNConvNet(widths=(4,))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), False)
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

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

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
Convert = Callable[[np.ndarray], np.ndarray]
KINDS = {"conv": "convolution", "dense": "dense (Linear)", "norm": "norm (BatchNorm)"}
_TORCH_ATTRS = {
    "conv": ("weight", "bias"),
    "dense": ("weight", "bias"),
    "norm": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
}


@dataclasses.dataclass
class _TorchLayer:
    name: str  # Module name, "" for a state dict of one bare layer.
    keys: dict[str, str]  # Attribute ("weight", ...) -> state-dict key.
    kind: str = ""

    def key(self, attr: str) -> str:
        return f"{self.name}.{attr}" if self.name else attr


@dataclasses.dataclass
class _JbnLayer:
    path: Path
    params: dict[str, Any]  # Leaves (arrays or ShapeDtypeStructs) by name.
    stats: dict[str, Any]
    kind: str = ""

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class _Link:
    """One torch key <-> one jbn leaf, with the layout change both ways."""

    key: str
    where: Path  # ("params" | "batch_stats", *module path, leaf name)
    to_jbn: Convert
    to_torch: Convert


def _torch_layers(shapes: Mapping[str, tuple[int, ...]]) -> list[_TorchLayer]:
    layers: dict[str, _TorchLayer] = {}
    for key in shapes:
        module, _, attr = key.rpartition(".")
        layers.setdefault(module, _TorchLayer(module, {})).keys[attr] = key
    for layer in layers.values():
        if "running_mean" in layer.keys or "running_var" in layer.keys:
            layer.kind = "norm"
        elif "weight" in layer.keys and len(shapes[layer.keys["weight"]]) >= 2:
            layer.kind = "conv" if len(shapes[layer.keys["weight"]]) >= 3 else "dense"
        else:
            raise ValueError(
                f"unexpected keys {sorted(layer.keys.values())}: PyTorch layer "
                f"{layer.name!r} is not a convolution, Linear or BatchNorm with running stats"
            )
        for attr, key in layer.keys.items():
            if attr not in _TORCH_ATTRS[layer.kind]:
                raise ValueError(f"unexpected key {key!r} in PyTorch {KINDS[layer.kind]} layer")
    return list(layers.values())


def _natural_key(path: Path) -> tuple[Any, ...]:
    """``("layer2_10", "conv1")`` sorts after ``("layer2_9", ...)``: digits compared as numbers."""
    return tuple(
        tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
        for name in path
    )


def _leaf_dicts(tree: Mapping[str, Any], path: Path = ()) -> Iterator[tuple[Path, dict]]:
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield path, leaves
    for name, child in tree.items():
        if isinstance(child, Mapping):
            yield from _leaf_dicts(child, (*path, name))


def _jbn_layers(variables: Mapping[str, Any]) -> list[_JbnLayer]:
    params = dict(_leaf_dicts(variables.get("params", {})))
    stats = dict(_leaf_dicts(variables.get("batch_stats", {})))
    layers = []
    for path in sorted({*params, *stats}, key=_natural_key):
        layer = _JbnLayer(path, params.get(path, {}), stats.get(path, {}))
        if layer.stats:
            layer.kind = "norm"
            ok = {"mean", "var"} <= set(layer.stats) <= {"mean", "var", "count"}
            ok = ok and set(layer.params) <= {"scale", "bias"}
        else:
            kernel = layer.params.get("kernel")
            layer.kind = "dense" if kernel is not None and len(kernel.shape) == 2 else "conv"
            ok = kernel is not None and set(layer.params) <= {"kernel", "bias"}
        if not ok:
            raise ValueError(
                f"jbn layer {layer.name!r} (params {sorted(layer.params)}, batch_stats "
                f"{sorted(layer.stats)}) is not a convolution, dense or BatchNorm layer"
            )
        layers.append(layer)
    return layers


def _pairs(
    torch_layers: list[_TorchLayer], jbn_layers: list[_JbnLayer]
) -> list[tuple[_TorchLayer, _JbnLayer]]:
    pairs = []
    for kind, label in KINDS.items():
        ours = [layer for layer in jbn_layers if layer.kind == kind]
        theirs = [layer for layer in torch_layers if layer.kind == kind]
        if len(theirs) > len(ours):
            extra = [key for layer in theirs[len(ours) :] for key in layer.keys.values()]
            raise ValueError(
                f"unexpected keys {extra}: the state dict has {len(theirs)} {label} layers, "
                f"the jbn variables {len(ours)}; pairing them in order leaves these over"
            )
        if len(ours) > len(theirs):
            missing = [layer.name for layer in ours[len(theirs) :]]
            raise ValueError(
                f"missing keys: the state dict has {len(theirs)} {label} layers, the jbn "
                f"variables {len(ours)}; pairing them in order leaves jbn {missing} over"
            )
        pairs += zip(theirs, ours, strict=True)
    return pairs


def _flatten_inputs(torch_layers: list[_TorchLayer], shapes: Mapping) -> dict[str, int]:
    """Channels of the conv map each dense layer reads (PyTorch order), if right after convs."""
    channels, found = None, {}
    for layer in torch_layers:
        if layer.kind == "conv":
            channels = shapes[layer.keys["weight"]][0]
        elif layer.kind == "dense":
            if channels is not None:
                found[layer.name] = channels
            channels = None
    return found


class _Linker:
    """Builds the `_Link` s of one pair of layers, checking every key and shape."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], spatial_shape: Any):
        self.shapes, self.spatial_shape = shapes, spatial_shape

    def link(
        self,
        theirs: _TorchLayer,
        ours: _JbnLayer,
        attr: str,
        where: Path,
        shape: tuple,
        to_jbn,
        to_torch,
    ) -> _Link:
        key = theirs.keys.get(attr)
        if key is None:
            raise ValueError(
                f"missing key {theirs.key(attr)!r}: jbn {'/'.join((*ours.path, where[-1]))} "
                f"needs it (shape {shape})"
            )
        if tuple(self.shapes[key]) != tuple(shape):
            raise ValueError(
                f"mis-shaped key {key!r}: {tuple(self.shapes[key])} in the state dict, but jbn "
                f"{'/'.join((*ours.path, where[-1]))} needs {tuple(shape)} (PyTorch layout)"
            )
        return _Link(key, (where[0], *ours.path, where[-1]), to_jbn, to_torch)

    def optional(self, theirs, ours, attr: str, leaf: str, collection: str) -> bool:
        """Whether both or neither side has it; raises when only one does."""
        has_theirs = attr in theirs.keys
        has_ours = leaf in (ours.params if collection == "params" else ours.stats)
        if has_theirs and not has_ours:
            raise ValueError(f"unexpected key {theirs.keys[attr]!r}: jbn {ours.name} has no {leaf}")
        if has_ours and not has_theirs:
            raise ValueError(f"missing key {theirs.key(attr)!r} for jbn {ours.name}/{leaf}")
        return has_ours

    def weights(
        self, theirs: _TorchLayer, ours: _JbnLayer, flatten_channels: int | None
    ) -> list[_Link]:
        kernel_shape = tuple(ours.params["kernel"].shape)
        if ours.kind == "conv":
            torch_shape = (kernel_shape[-1], kernel_shape[-2], *kernel_shape[:-2])
            to_jbn = lambda w: np.moveaxis(w, (0, 1), (-1, -2))  # noqa: E731
            to_torch = lambda k: np.moveaxis(k, (-1, -2), (0, 1))  # noqa: E731
        else:
            torch_shape = kernel_shape[::-1]
            to_jbn, to_torch = np.transpose, np.transpose
            chw = self._chw(theirs, flatten_channels, kernel_shape[0])
            if chw is not None:
                to_jbn = lambda w: dense_from_torch_after_flatten(w, None, chw)["kernel"]  # noqa: E731
                to_torch = lambda k: dense_to_torch_before_flatten(k, chw)  # noqa: E731
        links = [
            self.link(theirs, ours, "weight", ("params", "kernel"), torch_shape, to_jbn, to_torch)
        ]
        if self.optional(theirs, ours, "bias", "bias", "params"):
            shape = (kernel_shape[-1],)
            links.append(self.link(theirs, ours, "bias", ("params", "bias"), shape, _same, _same))
        return links

    def _chw(self, theirs: _TorchLayer, channels: int | None, inputs: int) -> tuple | None:
        if channels is None or inputs == channels:
            return None
        if self.spatial_shape is not None:
            height, width = self.spatial_shape
        else:
            height = width = math.isqrt(inputs // channels)
        if channels * height * width != inputs:
            raise ValueError(
                f"{theirs.key('weight')!r} takes {inputs} inputs after a {channels}-channel "
                f"convolution: not C*H*W of a {height}x{width} map; pass spatial_shape=(H, W)"
            )
        return channels, height, width

    def norm(self, theirs: _TorchLayer, ours: _JbnLayer) -> list[_Link]:
        shape = tuple(ours.stats["mean"].shape)
        links = []
        for attr, leaf in (("weight", "scale"), ("bias", "bias")):
            if self.optional(theirs, ours, attr, leaf, "params"):
                links.append(self.link(theirs, ours, attr, ("params", leaf), shape, _same, _same))
        for attr, leaf in (("running_mean", "mean"), ("running_var", "var")):
            links.append(self.link(theirs, ours, attr, ("batch_stats", leaf), shape, _same, _same))
        if "count" in ours.stats:
            links.append(
                self.link(
                    theirs, ours, "num_batches_tracked", ("batch_stats", "count"), (), _same, _same
                )
            )
        return links


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _links(
    shapes: Mapping[str, tuple[int, ...]], variables: Mapping[str, Any], spatial_shape: Any
) -> list[_Link]:
    torch_layers = _torch_layers(shapes)
    flatten = _flatten_inputs(torch_layers, shapes)
    linker = _Linker(shapes, spatial_shape)
    links = []
    for theirs, ours in _pairs(torch_layers, _jbn_layers(variables)):
        if ours.kind == "norm":
            links += linker.norm(theirs, ours)
        else:
            links += linker.weights(theirs, ours, flatten.get(theirs.name))
    return links


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
      state_dict: ``torch_model.state_dict()`` (tensors or NumPy arrays).
      variables: ``model.init(...)`` of the jbn model, or ``jax.eval_shape`` of
        it; only the shapes and dtypes of ``params`` and ``batch_stats`` are read.
      spatial_shape: ``(H, W)`` of the map flattened before the first Linear,
        when it is not square (ignored after global pooling).

    Returns:
      New variables: every ``params``/``batch_stats`` leaf from the state dict,
      in the dtype of ``variables``; other collections unchanged.

    Raises:
      ValueError: Naming the key when one is missing, unexpected or mis-shaped,
        or the layers when the two networks do not pair up.
    """
    shapes = {key: to_numpy(value).shape for key, value in state_dict.items()}
    out = _copy(dict(variables))
    for link in _links(shapes, variables, spatial_shape):
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
    links = _links({key: t.shape for key, t in templates.items()}, variables, spatial_shape)
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
