"""The registration order of a PyTorch state dict's modules, as far as its keys tell it.

``torch_model.state_dict()`` lists each module's own parameters and buffers,
then its children's, in the order they were registered. Other orders lose that:
``dict(sorted(state_dict.items()))`` sorts the keys, so ``"10.weight"`` comes
before ``"2.weight"`` and ``bn1`` before ``conv1``; a safetensors file holds
them by dtype, then by name (``num_batches_tracked`` apart from its layer).
`ModuleOrder` reconstructs what the keys can tell:

- Numbered children (``nn.Sequential``, ``nn.ModuleList``: ``block.2``,
  ``block.10``) were registered in numeric order, whatever the key order.
- Named children (``conv1``, ``bn1``, ``head``) keep the order in which they
  first appear. That is their registration order when the state dict is in
  PyTorch's order, taken as given (`ModuleOrder.trusted`) when every module's
  keys are contiguous, numbered children ascend, each layer's own keys come as
  PyTorch registers them (``weight`` before ``bias``, ``running_mean`` before
  ``running_var``) and the keys are not sorted. Otherwise the order of named
  siblings is unknown (`ModuleOrder.certain` says so), and
  `jbn.tools.torch_pairing` pairs such layers by name or shape, or refuses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["ModuleOrder", "module_name", "natural_key"]

Path = tuple[str, ...]
# The order in which PyTorch's layers register their own parameters and buffers.
_ATTR_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def module_name(key: str) -> str:
    """``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"`` (``""`` for a bare layer's key)."""
    return key.rpartition(".")[0]


def _path(module: str) -> Path:
    return tuple(module.split(".")) if module else ()


def natural_key(text: str) -> tuple[Any, ...]:
    """``"layer10"`` sorts after ``"layer9"``: digits compared as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _is_sorted(keys: Sequence[str]) -> bool:
    return list(keys) == sorted(keys) or list(keys) == sorted(keys, key=natural_key)


class ModuleOrder:
    """The modules holding a state dict's keys, in their registration order where known.

    Attributes:
      trusted: Whether the keys are in PyTorch's order (see the module docstring).
      modules: Module names, one per module holding keys, in reconstructed order.
      fully_certain: Whether `modules` is surely the registration order: trusted
        keys, or no module with two children of which one is named.
    """

    def __init__(self, keys: Sequence[str]):
        """Reads the order from the keys.

        Args:
          keys: The state dict's keys, in its order.
        """
        keys = list(keys)
        first_seen = list(dict.fromkeys(module_name(key) for key in keys))
        self.trusted = (
            len(keys) < 2
            or not _is_sorted(keys)
            and _contiguous(keys)
            and _numbered_children_ascend(first_seen)
            and _own_keys_in_torch_order(keys)
        )
        self.modules = _depth_first(first_seen, numbered_by_number=not self.trusted)
        self._position = {name: i for i, name in enumerate(self.modules)}
        self.fully_certain = self.trusted or all(
            len(names) < 2 or all(name.isdigit() for name in names)
            for names in _children(first_seen).values()
        )

    def position(self, module: str) -> int:
        """Where ``module`` comes in `modules`."""
        return self._position[module]

    def certain(self, a: str, b: str) -> bool:
        """Whether the keys tell which of modules ``a`` and ``b`` was registered first."""
        return self.trusted or self._certain_paths(_path(a), _path(b))

    def _certain_paths(self, a: Path, b: Path) -> bool:
        for mine, theirs in zip(a, b, strict=False):
            if mine != theirs:  # Siblings: known only if both are numbered.
                return mine.isdigit() and theirs.isdigit()
        return True  # One contains the other: a module's own keys come before its children's.


def _prefixes(module: str) -> list[Path]:
    path = _path(module)
    return [path[:depth] for depth in range(1, len(path) + 1)]


def _contiguous(keys: Sequence[str]) -> bool:
    """Whether each module's keys (its children's included) form one run."""
    first: dict[Path, int] = {}
    count: dict[Path, int] = {}
    for index, key in enumerate(keys):
        for prefix in _prefixes(module_name(key)):
            first.setdefault(prefix, index)
            count[prefix] = count.get(prefix, 0) + 1
            if index - first[prefix] + 1 != count[prefix]:
                return False
    return True


def _children(modules: Sequence[str]) -> dict[Path, list[str]]:
    """Each module path's children names, in order of first appearance."""
    children: dict[Path, list[str]] = {}
    for module in modules:
        path = _path(module)
        for depth in range(len(path)):
            names = children.setdefault(path[:depth], [])
            if path[depth] not in names:
                names.append(path[depth])
    return children


def _numbered_children_ascend(modules: Sequence[str]) -> bool:
    for names in _children(modules).values():
        numbers = [int(name) for name in names if name.isdigit()]
        if numbers != sorted(numbers):
            return False
    return True


def _own_keys_in_torch_order(keys: Sequence[str]) -> bool:
    attrs: dict[str, list[int]] = {}
    for key in keys:
        module, _, attr = key.rpartition(".")
        if attr in _ATTR_ORDER:
            attrs.setdefault(module, []).append(_ATTR_ORDER.index(attr))
    return all(ranks == sorted(ranks) for ranks in attrs.values())


def _depth_first(modules: Sequence[str], numbered_by_number: bool) -> list[str]:
    """Modules in tree order: a module, then its children in order of first appearance.

    With ``numbered_by_number``, numbered children take the places of numbered
    children in numeric order (``"10"`` after ``"9"``, as registered).
    """
    children = _children(modules)
    holding = set(modules)
    if numbered_by_number:
        for names in children.values():
            slots = [i for i, name in enumerate(names) if name.isdigit()]
            for slot, name in zip(slots, sorted((names[i] for i in slots), key=int), strict=True):
                names[slot] = name
    order: list[str] = []

    def visit(path: Path) -> None:
        if ".".join(path) in holding:
            order.append(".".join(path))
        for name in children.get(path, []):
            visit((*path, name))

    visit(())
    return order
