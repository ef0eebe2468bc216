"""Models by name: ``make_model(config.model)`` for configs and the command line."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from jbn.models.small_cnn import SmallBNConvNet

__all__ = ["NORM_NAMES", "make_model", "model_names"]

_MODELS: dict[str, type[nn.Module]] = {"SmallBNConvNet": SmallBNConvNet}
NORM_NAMES = ("jbn", "flax")  # config.model.norm: jbn.BatchNorm or flax.linen.BatchNorm.


def model_names() -> tuple[str, ...]:
    """The names ``config.model.name`` accepts."""
    return tuple(sorted(_MODELS))


def make_model(model_config: Any) -> nn.Module:
    """Builds a model from a ``config.model`` ConfigDict (or any mapping-like object).

    Args:
        model_config: With fields ``name``, ``num_classes``, ``widths``,
            ``use_batch_norm``, ``bn_momentum``, ``bn_epsilon`` and optionally
            ``virtual_batch_size``, ``norm`` (``"jbn"`` or ``"flax"``),
            ``patch_conv_channels`` and ``native_input_conv``.

    Returns:
        The (unbound) flax module.

    Raises:
        ValueError: For an unknown model name or norm layer.
    """
    name = model_config.name
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {sorted(_MODELS)}.")
    norm_name = model_config.get("norm", "jbn")
    if norm_name not in NORM_NAMES:
        raise ValueError(f"Unknown norm {norm_name!r}; expected one of {NORM_NAMES}.")
    norm = None
    if norm_name == "flax":
        if model_config.get("virtual_batch_size") is not None:
            raise ValueError("virtual_batch_size needs norm='jbn'; flax.linen.BatchNorm lacks it.")
        norm = functools.partial(
            nn.BatchNorm, momentum=model_config.bn_momentum, epsilon=model_config.bn_epsilon
        )
    return _MODELS[name](
        num_classes=model_config.num_classes,
        widths=tuple(model_config.widths),
        use_batch_norm=model_config.use_batch_norm,
        momentum=model_config.bn_momentum,
        epsilon=model_config.bn_epsilon,
        virtual_batch_size=model_config.get("virtual_batch_size"),
        norm=norm,
        patch_conv_channels=model_config.get("patch_conv_channels", 4),
        native_input_conv=model_config.get("native_input_conv", False),
    )
