"""Models by name: ``make_model(config.model)`` for configs and the command line.

``config.model.name`` picks the network (`model_names`), ``config.model.norm``
the norm layer (`NORM_NAMES`): ``"jbn"`` (`jbn.BatchNorm`, with ghost batches
when ``virtual_batch_size`` is set), ``"flax"`` (``flax.linen.BatchNorm``) or
``"renorm"`` (`jbn.BatchRenorm`). Each model reads the fields it knows and
ignores the others (``widths`` is SmallBNConvNet's and the MLP's, ``stem`` the
ResNets'), so
one config runs the whole zoo: ``--config.model.name=resnet56``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jbn.core.renorm import renorm_clip_schedule
from jbn.linen import BatchRenorm
from jbn.models import cifar_resnet, resnet
from jbn.models.mlp import MLP
from jbn.models.small_cnn import SmallBNConvNet

__all__ = ["NORM_NAMES", "make_model", "model_names"]

# config.model fields each family reads (besides the common ones of make_model);
# a field that is absent or None keeps the model's default.
_SMALL_CNN_FIELDS = ("widths", "patch_conv_channels", "native_input_conv")
_RESNET_FIELDS = ("stem", "shortcut", "activation", "zero_init_residual")
_MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "SmallBNConvNet": (SmallBNConvNet, _SMALL_CNN_FIELDS),
    "mlp": (MLP, ("widths", "activation")),
    **{
        name: (getattr(resnet, name), _RESNET_FIELDS)
        for name in ("resnet18", "resnet34", "resnet50")
    },
    **{
        name: (getattr(cifar_resnet, name), _RESNET_FIELDS)
        for name in (
            "resnet20",
            "resnet32",
            "resnet56",
            "resnet110",
            "plain20",
            "plain32",
            "plain56",
        )
    },
}
# config.model.norm: jbn.BatchNorm, flax.linen.BatchNorm or jbn.BatchRenorm.
NORM_NAMES = ("jbn", "flax", "renorm")


def model_names() -> tuple[str, ...]:
    """The names ``config.model.name`` accepts."""
    return tuple(sorted(_MODELS))


def _norm_factory(model_config: Any) -> Callable[..., nn.Module] | None:
    """The ``norm=`` factory for ``config.model.norm`` (``None``: the model's jbn.BatchNorm)."""
    norm_name = model_config.get("norm", "jbn")
    if norm_name not in NORM_NAMES:
        raise ValueError(f"Unknown norm {norm_name!r}; expected one of {NORM_NAMES}.")
    if norm_name == "jbn":
        return None
    if model_config.get("virtual_batch_size") is not None:
        raise ValueError(
            f"virtual_batch_size needs norm='jbn'; norm={norm_name!r} has no ghost batches."
        )
    kwargs = {"momentum": model_config.bn_momentum, "epsilon": model_config.bn_epsilon}
    if norm_name == "flax":
        return functools.partial(nn.BatchNorm, **kwargs)
    warmup, ramp = model_config.get("renorm_warmup_steps"), model_config.get("renorm_ramp_steps")
    r_max, d_max = model_config.get("renorm_r_max", 3.0), model_config.get("renorm_d_max", 5.0)
    if warmup is None and ramp is None:  # Fixed clips from the first step.
        return functools.partial(BatchRenorm, r_max=r_max, d_max=d_max, **kwargs)
    schedule = functools.partial(
        renorm_clip_schedule,
        warmup_steps=warmup or 0,
        ramp_steps=ramp or 0,
        r_max_final=r_max,
        d_max_final=d_max,
    )
    return functools.partial(BatchRenorm, clip_schedule=schedule, **kwargs)


def make_model(model_config: Any) -> nn.Module:
    """Builds a model from a ``config.model`` ConfigDict (or any mapping-like object).

    Args:
        model_config: With fields ``name``, ``num_classes``, ``use_batch_norm``,
            ``bn_momentum``, ``bn_epsilon`` and optionally ``virtual_batch_size``,
            ``norm`` (one of `NORM_NAMES`; ``"renorm"`` reads ``renorm_r_max``,
            ``renorm_d_max``, ``renorm_warmup_steps`` and ``renorm_ramp_steps``:
            fixed clips when both steps are None, else `jbn.renorm_clip_schedule`),
            and the model's own fields: SmallBNConvNet's ``widths``,
            ``patch_conv_channels``, ``native_input_conv``; the ResNets'
            ``stem``, ``shortcut``, ``activation``, ``zero_init_residual``;
            the MLP's ``widths`` and ``activation``.

    Returns:
        The (unbound) flax module.

    Raises:
        ValueError: For an unknown model name or norm layer.
    """
    name = model_config.name
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {model_names()}.")
    constructor, fields = _MODELS[name]
    kwargs = {field: model_config.get(field) for field in fields}
    kwargs = {field: value for field, value in kwargs.items() if value is not None}
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return constructor(
        num_classes=model_config.num_classes,
        use_batch_norm=model_config.use_batch_norm,
        momentum=model_config.bn_momentum,
        epsilon=model_config.bn_epsilon,
        virtual_batch_size=model_config.get("virtual_batch_size"),
        norm=_norm_factory(model_config),
        **kwargs,
    )
