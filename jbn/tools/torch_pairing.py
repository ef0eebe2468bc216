"""Which PyTorch state-dict key goes to which jbn variable: layers cut out and paired.

The state dict is cut into layers by module name (``layer1.0.conv1.weight`` ->
``layer1.0.conv1``), the variables into the modules that hold arrays. Each is a
convolution (a ``weight`` of 3+ dimensions / a ``kernel`` of 3+), a dense layer
(2 dimensions) or a norm layer (``running_mean``/``running_var`` /
``batch_stats``). Layers of each kind are paired:

- by name, when the names of that kind's layers correspond one to one
  (``layer1.0.downsample.0`` <-> ``layer1_0/downsample_0``: the parts between
  dots, slashes and underscores are equal), whatever the key order;
- otherwise in order: PyTorch's registration order (`jbn.tools.torch_order`
  reconstructs it from the keys) with jbn's module paths in natural order
  (numbers compared as numbers). Where the keys do not tell the order of
  some layers (sorted keys, a safetensors file), each shape's layers are
  paired in order among themselves; two layers of equal shape in an unknown
  order raise an error rather than risk a silent swap.

`links` returns one `Link` per key, with the layout change both ways, after
checking every key and shape; used by `jbn.tools.interop_torch`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jbn.tools.torch_layers import dense_to_torch_before_flatten
from jbn.tools.torch_order import ModuleOrder, natural_key

__all__ = ["KINDS", "Link", "links"]

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
    shape: tuple[int, ...] = ()  # Of the weight (conv, dense) or the running stats (norm).

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

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """What `_TorchLayer.shape` is for the PyTorch layer that matches this one."""
        if self.kind == "norm":
            return tuple(self.stats["mean"].shape)
        kernel = tuple(self.params["kernel"].shape)
        return (kernel[-1], kernel[-2], *kernel[:-2])  # (O, I, *window); (out, in) if dense.


_Pair = tuple[_TorchLayer, _JbnLayer]


@dataclasses.dataclass(frozen=True)
class Link:
    """One torch key <-> one jbn leaf, with the layout change both ways."""

    key: str
    where: Path  # ("params" | "batch_stats", *module path, leaf name)
    to_jbn: Convert
    to_torch: Convert


def _torch_layers(shapes: Mapping[str, tuple[int, ...]], order: ModuleOrder) -> list[_TorchLayer]:
    """The state dict's layers, in `order`."""
    layers: dict[str, _TorchLayer] = {}
    for key in shapes:
        module, _, attr = key.rpartition(".")
        layers.setdefault(module, _TorchLayer(module, {})).keys[attr] = key
    for layer in layers.values():
        if "running_mean" in layer.keys or "running_var" in layer.keys:
            layer.kind = "norm"
            layer.shape = shapes[layer.keys.get("running_mean") or layer.keys["running_var"]]
        elif "weight" in layer.keys and len(shapes[layer.keys["weight"]]) >= 2:
            layer.kind = "conv" if len(shapes[layer.keys["weight"]]) >= 3 else "dense"
            layer.shape = shapes[layer.keys["weight"]]
        else:
            raise ValueError(
                f"unexpected keys {sorted(layer.keys.values())}: PyTorch layer "
                f"{layer.name!r} is not a convolution, Linear or BatchNorm with running stats"
            )
        for attr, key in layer.keys.items():
            if attr not in _TORCH_ATTRS[layer.kind]:
                raise ValueError(f"unexpected key {key!r} in PyTorch {KINDS[layer.kind]} layer")
    return [layers[name] for name in order.modules]


def _natural_key(path: Path) -> tuple[Any, ...]:
    """``("layer2_10", "conv1")`` sorts after ``("layer2_9", ...)``: digits compared as numbers."""
    return tuple(natural_key(name) for name in path)


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


def _words(names: Path) -> tuple[str, ...]:
    """``("layer1", "0", "downsample", "0")`` and ``("layer1_0", "downsample_0")`` alike."""
    return tuple(word for name in names for word in name.split("_"))


def _by_name(theirs: list[_TorchLayer], ours: list[_JbnLayer]) -> list[_Pair] | None:
    """Pairs by name when the names correspond one to one, else None."""
    torch_words = {_words(tuple(layer.name.split("."))): layer for layer in theirs}
    jbn_words = {_words(layer.path): layer for layer in ours}
    if len(torch_words) != len(theirs) or len(jbn_words) != len(ours):
        return None
    if not theirs or torch_words.keys() != jbn_words.keys():
        return None
    return [(layer, jbn_words[words]) for words, layer in torch_words.items()]


def _by_shape(
    theirs: list[_TorchLayer], ours: list[_JbnLayer], order: ModuleOrder, label: str
) -> list[_Pair] | None:
    """Pairs layers of each shape in order, where the keys leave some order unknown.

    Returns None when the order is known (pairing in order is right) or the
    shapes differ between the two networks (pairing in order names the
    difference). Raises when two layers of one shape come in an unknown order.
    """
    if all(order.certain(a.name, b.name) for a, b in itertools.combinations(theirs, 2)):
        return None
    torch_groups: dict[tuple[int, ...], list[_TorchLayer]] = {}
    for layer in theirs:
        torch_groups.setdefault(tuple(layer.shape), []).append(layer)
    jbn_groups: dict[tuple[int, ...], list[_JbnLayer]] = {}
    for layer in ours:
        jbn_groups.setdefault(layer.torch_shape, []).append(layer)
    if {s: len(g) for s, g in torch_groups.items()} != {s: len(g) for s, g in jbn_groups.items()}:
        return None
    for shape, group in torch_groups.items():
        for a, b in itertools.combinations(group, 2):
            if not order.certain(a.name, b.name):
                raise ValueError(
                    f"ambiguous key order: PyTorch {label} layers {a.name!r} and {b.name!r} "
                    f"have the same shape {shape}, and the state dict's keys do not say which "
                    "was registered first (they are not in PyTorch's order: sorted, or from a "
                    "safetensors file?); pass torch_model.state_dict() as it is, or give the "
                    "jbn modules PyTorch's names so that layers pair by name"
                )
    pairs = [
        pair for s, group in torch_groups.items() for pair in zip(group, jbn_groups[s], strict=True)
    ]
    return sorted(pairs, key=lambda pair: _natural_key(pair[1].path))


def _in_order(theirs: list[_TorchLayer], ours: list[_JbnLayer], label: str) -> list[_Pair]:
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
    return list(zip(theirs, ours, strict=True))


def _pairs(
    torch_layers: list[_TorchLayer], jbn_layers: list[_JbnLayer], order: ModuleOrder
) -> list[_Pair]:
    pairs = []
    for kind, label in KINDS.items():
        ours = [layer for layer in jbn_layers if layer.kind == kind]
        theirs = [layer for layer in torch_layers if layer.kind == kind]
        pairs += (
            _by_name(theirs, ours)
            or _by_shape(theirs, ours, order, label)
            or _in_order(theirs, ours, label)
        )
    return pairs


def _flatten_inputs(pairs: list[_Pair], order: ModuleOrder) -> dict[str, int]:
    """Channels of the conv map each dense layer reads, if it reads one (by PyTorch name).

    In a known order: each dense layer right after convolutions. Otherwise the
    convolutions are taken to come first (a CNN's features, then its
    classifier): the first dense layer reads the last convolution, both in jbn's
    order of their partners; an error if the keys say otherwise.
    """
    if order.fully_certain:
        channels, found = None, {}
        for layer in sorted((theirs for theirs, _ in pairs), key=lambda t: order.position(t.name)):
            if layer.kind == "conv":
                channels = layer.shape[0]
            elif layer.kind == "dense":
                if channels is not None:
                    found[layer.name] = channels
                channels = None
        return found
    in_jbn_order = [theirs for theirs, _ in sorted(pairs, key=lambda p: _natural_key(p[1].path))]
    convs = [layer for layer in in_jbn_order if layer.kind == "conv"]
    denses = [layer for layer in in_jbn_order if layer.kind == "dense"]
    for conv, dense in itertools.product(convs, denses):
        conv_after = order.position(conv.name) > order.position(dense.name)
        if conv_after and order.certain(conv.name, dense.name):
            raise ValueError(
                f"ambiguous key order: PyTorch dense layer {dense.name!r} comes before "
                f"convolution {conv.name!r}, and the state dict's keys do not say where the "
                "other dense layers sit (they are not in PyTorch's order), hence which one "
                "reads a flattened map; pass torch_model.state_dict() as it is"
            )
    return {denses[0].name: convs[-1].shape[0]} if convs and denses else {}


class _Linker:
    """Builds the `Link` s of one pair of layers, checking every key and shape."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], spatial_shape: Any):
        self.shapes, self.spatial_shape = shapes, spatial_shape

    def link(
        self,
        theirs: _TorchLayer,
        ours: _JbnLayer,
        attr: str,
        where: Path,
        shape: tuple[int, ...],
        to_jbn: Convert,
        to_torch: Convert,
    ) -> Link:
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
        return Link(key, (where[0], *ours.path, where[-1]), to_jbn, to_torch)

    def optional(
        self, theirs: _TorchLayer, ours: _JbnLayer, attr: str, leaf: str, collection: str
    ) -> bool:
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
    ) -> list[Link]:
        kernel_shape = tuple(ours.params["kernel"].shape)
        if ours.kind == "conv":
            torch_shape = (kernel_shape[-1], kernel_shape[-2], *kernel_shape[:-2])
            to_jbn, to_torch = _conv_kernel_to_jbn, _conv_kernel_to_torch
        else:
            torch_shape = kernel_shape[::-1]
            to_jbn, to_torch = np.transpose, np.transpose
            chw = self._chw(theirs, flatten_channels, kernel_shape[0])
            if chw is not None:  # The first Linear after a flatten of a C x H x W map.
                to_jbn = functools.partial(_flattened_dense_to_jbn, chw_shape=chw)
                to_torch = functools.partial(dense_to_torch_before_flatten, chw_shape=chw)
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

    def norm(self, theirs: _TorchLayer, ours: _JbnLayer) -> list[Link]:
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


def _conv_kernel_to_jbn(weight: np.ndarray) -> np.ndarray:
    return np.moveaxis(weight, (0, 1), (-1, -2))  # (O, I, *window) -> (*window, I, O)


def _conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    return np.moveaxis(kernel, (-1, -2), (0, 1))


def _flattened_dense_to_jbn(weight: np.ndarray, chw_shape: tuple[int, int, int]) -> np.ndarray:
    """Rows from PyTorch's (C, H, W) flatten order to NHWC's (H, W, C), as in `torch_layers`."""
    c, h, w = chw_shape
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def links(
    shapes: Mapping[str, tuple[int, ...]],
    variables: Mapping[str, Any],
    spatial_shape: tuple[int, int] | None = None,
) -> list[Link]:
    """Pairs a state dict's keys with the leaves of jbn variables.

    Args:
      shapes: ``{state-dict key: shape}`` in the state dict's order.
      variables: jbn variables (arrays or ``jax.ShapeDtypeStruct`` s).
      spatial_shape: ``(H, W)`` of a non-square map flattened before a Linear.

    Returns:
      One `Link` per paired key (``num_batches_tracked`` only when the jbn
      layer keeps a ``count``).

    Raises:
      ValueError: Naming the key when one is missing, unexpected or mis-shaped.
    """
    order = ModuleOrder(list(shapes))
    pairs = _pairs(_torch_layers(shapes, order), _jbn_layers(variables), order)
    flatten = _flatten_inputs(pairs, order)
    linker = _Linker(shapes, spatial_shape)
    found = []
    for theirs, ours in pairs:
        if ours.kind == "norm":
            found += linker.norm(theirs, ours)
        else:
            found += linker.weights(theirs, ours, flatten.get(theirs.name))
    return found
