"""Which PyTorch state-dict key goes to which jbn variable: layers cut out and paired.

The state dict is cut into layers by module name (``layer1.0.conv1.weight`` ->
``layer1.0.conv1``), the variables into the modules that hold arrays. Each is a
convolution (a ``weight`` of 3+ dimensions / a ``kernel`` of 3+), a dense layer
(2 dimensions) or a norm layer (``running_mean``/``running_var`` /
``batch_stats``). Layers of each kind are paired in order: PyTorch's
registration order (the state dict's) with jbn's module paths in natural order
(numbers compared as numbers). `links` returns one `Link` per key, with the
layout change both ways, after checking every key and shape; used by
`jbn.tools.interop_torch`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jbn.tools.torch_layers import dense_to_torch_before_flatten

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
class Link:
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
    torch_layers = _torch_layers(shapes)
    flatten = _flatten_inputs(torch_layers, shapes)
    linker = _Linker(shapes, spatial_shape)
    found = []
    for theirs, ours in _pairs(torch_layers, _jbn_layers(variables)):
        if ours.kind == "norm":
            found += linker.norm(theirs, ours)
        else:
            found += linker.weights(theirs, ours, flatten.get(theirs.name))
    return found
