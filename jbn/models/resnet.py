"""ResNets in torchvision's layout: ``ResNet`` and ``resnet18/34/50`` (NHWC, flax.linen).

The architecture of ``torchvision.models.resnet`` ("v1.5": a Bottleneck
downsamples in its 3x3 convolution), with the same layer names, so a
torchvision ``state_dict`` maps onto the variables (`jbn.tools.interop_torch`):
``conv1``, ``bn1``, ``layer{s}_{b}/{conv1,bn1,...,downsample_0,downsample_1}``
(torchvision's ``layer{s}.{b}.downsample.0``) and ``fc``. The parameter counts
equal torchvision's (ResNet-18: 11,689,512 at 1000 classes).

Options beyond torchvision: ``stem="cifar"`` (a 3x3 stride-1 convolution and no
max pooling, for 32x32 inputs), any norm layer through ``norm``, no
normalisation (``use_batch_norm=False``: the convolutions get a bias), the
shortcut type (`jbn.models.blocks`) and the activation. The CIFAR ResNets of
He et al. 2016 are this class too (`jbn.models.cifar_resnet`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jbn.models import resnet18
    >>> model = resnet18(num_classes=10, stem="cifar")
    >>> x = jnp.zeros((1, 32, 32, 3))
    >>> jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]["fc"]
    {'bias': ShapeDtypeStruct(shape=(10,), dtype=float32), 'kernel': ShapeDtypeStruct(shape=(512, 10), dtype=float32)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn.models.blocks import (
    ACTIVATIONS,
    HE_NORMAL,
    SHORTCUTS,
    BasicBlock,
    Bottleneck,
    conv_layer,
)
from jbn.models.norm import ModuleFactory, norm_factory

__all__ = ["BLOCKS", "STEMS", "ResNet", "resnet18", "resnet34", "resnet50"]

BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A stem, stages of residual blocks, global average pooling and a linear classifier.

    Attributes:
        stage_sizes: Blocks per stage; every stage after the first halves the
            resolution in its first block.
        block: ``"basic"`` (`BasicBlock`) or ``"bottleneck"`` (`Bottleneck`).
        widths: Inner channels of each stage's blocks (the stem has ``widths[0]``).
        num_classes: Number of output logits.
        stem: ``"imagenet"`` (7x7 stride-2 convolution, 3x3 stride-2 max pooling)
            or ``"cifar"`` (3x3 stride-1 convolution, no pooling).
        shortcut: ``"B"`` (1x1 projection where the shape changes, torchvision),
            ``"A"`` (zero-padded identity) or ``"none"`` (a plain network).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``, after every norm
            layer except each block's last, and after each block's sum.
        zero_init_residual: Start each block's last norm scale at 0 (Goyal et
            al. 2017); needs a norm factory that takes ``scale_init``.
        use_batch_norm: Normalise after every convolution; if False the
            convolutions have a bias instead.
        momentum: Running-statistics decay of the default norm layer (Flax
            convention; PyTorch's ``momentum=0.1`` is 0.9 here).
        epsilon: Added to the variance by the default norm layer.
        virtual_batch_size: Ghost BatchNorm group size of the default norm layer.
        norm: Factory of the norm layer, called with ``use_running_average=...``
            and ``name=...``; overrides ``momentum``/``epsilon``/``virtual_batch_size``.
        dtype: Computation dtype of convolutions and the classifier.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 1000
    stem: str = "imagenet"
    shortcut: str = "B"
    activation: str = "relu"
    zero_init_residual: bool = False
    use_batch_norm: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    virtual_batch_size: int | None = None
    norm: ModuleFactory | None = None
    dtype: Any = jnp.float32

    def _check(self) -> None:
        checks = (
            ("block", self.block, tuple(BLOCKS)),
            ("stem", self.stem, STEMS),
            ("shortcut", self.shortcut, SHORTCUTS),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        )
        for field, value, known in checks:
            if value not in known:
                raise ValueError(f"Unknown {field} {value!r}; expected one of {known}.")
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(
                f"{len(self.stage_sizes)} stage sizes but {len(self.widths)} widths: "
                "give one width per stage."
            )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Computes logits.

        Args:
            x: Images, float ``[N, H, W, C]``.
            train: Normalise with batch statistics and update ``batch_stats``
                (call ``apply`` with ``mutable=["batch_stats"]``); otherwise use
                the running statistics.

        Returns:
            Logits of shape ``[N, num_classes]``.
        """
        self._check()
        norm = (
            norm_factory(
                self.norm,
                momentum=self.momentum,
                epsilon=self.epsilon,
                virtual_batch_size=self.virtual_batch_size,
            )
            if self.use_batch_norm
            else None
        )
        activation = ACTIVATIONS[self.activation]
        kernel = 7 if self.stem == "imagenet" else 3
        stride = 2 if self.stem == "imagenet" else 1
        x = conv_layer(
            self.widths[0],
            kernel,
            strides=stride,
            use_bias=norm is None,
            kernel_init=HE_NORMAL,
            dtype=self.dtype,
            name="conv1",
        )(x)
        if norm is not None:
            x = norm(use_running_average=not train, name="bn1")(x)
        x = activation(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = BLOCKS[self.block]
        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for index in range(size):
                x = block(
                    features=width,
                    strides=2 if stage > 0 and index == 0 else 1,
                    norm=norm,
                    shortcut=self.shortcut,
                    activation=activation,
                    zero_init_residual=self.zero_init_residual,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 as in torchvision: `BasicBlock` stages of 2, 2, 2, 2 (11.7 M parameters).

    Args:
        **kwargs: Any `ResNet` attribute (``num_classes``, ``norm``, ``stem``, ...).
    """
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 as in torchvision: `BasicBlock` stages of 3, 4, 6, 3 (21.8 M parameters).

    Args:
        **kwargs: Any `ResNet` attribute (``num_classes``, ``norm``, ``stem``, ...).
    """
    return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 as in torchvision (v1.5): `Bottleneck` stages of 3, 4, 6, 3 (25.6 M parameters).

    Args:
        **kwargs: Any `ResNet` attribute (``num_classes``, ``norm``, ``stem``, ...).
    """
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kwargs)
