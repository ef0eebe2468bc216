"""The CIFAR ResNets of He et al. 2016 (section 4.2) and their plain counterparts.

``resnet20/32/56/110`` (depth ``6n + 2``): a 3x3 convolution with 16 filters,
then three stages of ``n`` `BasicBlock` s with 16, 32 and 64 filters (the
second and third start with stride 2), global average pooling and a linear
layer. The paper's shortcut is option ``"A"`` (identity, zero channels padded
where the width doubles: no parameters); ``shortcut="B"`` uses 1x1 projections
there. ``plain20/32/56`` are the same stacks without any shortcut, the
baselines of the paper's figure 6 (``activation="sigmoid"`` and
``use_batch_norm=False`` give the variants where depth hurts most).

All are `jbn.models.resnet.ResNet` with ``stem="cifar"``, so every `ResNet`
attribute applies (``norm``, ``use_batch_norm``, ``zero_init_residual``,
``activation``, ...).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.models import resnet20
    >>> model = resnet20()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    >>> sum(x.size for x in jax.tree.leaves(variables["params"]))
    269722
"""

from __future__ import annotations

from typing import Any

from jbn.models.resnet import ResNet

__all__ = [
    "resnet_cifar",
    "plain20",
    "plain32",
    "plain56",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
]

CIFAR_WIDTHS = (16, 32, 64)


def resnet_cifar(depth: int, *, shortcut: str = "A", **kwargs: Any) -> ResNet:
    """A CIFAR ResNet (or, with ``shortcut="none"``, plain network) of ``depth`` layers.

    Args:
        depth: ``6 * n + 2`` weighted layers (``n`` blocks per stage).
        shortcut: ``"A"`` (the paper's), ``"B"`` or ``"none"``.
        **kwargs: Any other `ResNet` attribute (``num_classes`` defaults to 10).

    Returns:
        The (unbound) module.

    Raises:
        ValueError: If ``depth`` is not ``6n + 2``.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"A CIFAR ResNet has 6n + 2 layers (20, 32, 56, ...), got {depth}.")
    blocks = (depth - 2) // 6
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("stem", "cifar")
    return ResNet(
        stage_sizes=(blocks,) * 3, block="basic", widths=CIFAR_WIDTHS, shortcut=shortcut, **kwargs
    )


def _plain(depth: int, kwargs: dict[str, Any]) -> ResNet:
    shortcut = kwargs.pop("shortcut", "none")
    if shortcut != "none":
        raise ValueError(f"plain{depth} has no shortcuts; got shortcut={shortcut!r}.")
    return resnet_cifar(depth, shortcut="none", **kwargs)


def resnet20(**kwargs: Any) -> ResNet:
    """ResNet-20 (0.27 M parameters with shortcut ``"A"``); see `resnet_cifar`."""
    return resnet_cifar(20, **kwargs)


def resnet32(**kwargs: Any) -> ResNet:
    """ResNet-32 (0.46 M parameters with shortcut ``"A"``); see `resnet_cifar`."""
    return resnet_cifar(32, **kwargs)


def resnet56(**kwargs: Any) -> ResNet:
    """ResNet-56 (0.85 M parameters with shortcut ``"A"``); see `resnet_cifar`."""
    return resnet_cifar(56, **kwargs)


def resnet110(**kwargs: Any) -> ResNet:
    """ResNet-110 (1.7 M parameters with shortcut ``"A"``); see `resnet_cifar`."""
    return resnet_cifar(110, **kwargs)


def plain20(**kwargs: Any) -> ResNet:
    """ResNet-20 without shortcuts (the paper's plain-20); see `resnet_cifar`."""
    return _plain(20, kwargs)


def plain32(**kwargs: Any) -> ResNet:
    """ResNet-32 without shortcuts (the paper's plain-32); see `resnet_cifar`."""
    return _plain(32, kwargs)


def plain56(**kwargs: Any) -> ResNet:
    """ResNet-56 without shortcuts (the paper's plain-56); see `resnet_cifar`."""
    return _plain(56, kwargs)
