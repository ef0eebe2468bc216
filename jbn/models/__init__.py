"""Networks for the workbench, one module per family (flax.linen, NHWC).

Every model takes ``__call__(x, train)`` and a ``norm=`` factory, so any
BatchNorm-like layer (``jbn.BatchNorm``, ``flax.linen.BatchNorm``,
``jbn.BatchRenorm``) swaps in. `make_model` builds one from ``config.model``.

- `SmallBNConvNet` (`jbn.models.small_cnn`): the seed CNN.
- `MLP` (`jbn.models.mlp`): the fully connected sigmoid network of the
  BatchNorm paper's Figure 1 (``config.model.name="mlp"``).
- `ResNet`, `resnet18`, `resnet34`, `resnet50` (`jbn.models.resnet`):
  torchvision's ResNets, with a 32x32 ``stem="cifar"`` option.
- `resnet20`, `resnet32`, `resnet56`, `resnet110`, `plain20`, `plain32`,
  `plain56` (`jbn.models.cifar_resnet`): He et al. 2016, section 4.2.
"""

from jbn.models.cifar_resnet import (
    plain20,
    plain32,
    plain56,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    resnet_cifar,
)
from jbn.models.mlp import MLP
from jbn.models.registry import NORM_NAMES, make_model, model_names
from jbn.models.resnet import ResNet, resnet18, resnet34, resnet50
from jbn.models.small_cnn import SmallBNConvNet

__all__ = [
    "MLP",
    "NORM_NAMES",
    "ResNet",
    "SmallBNConvNet",
    "resnet_cifar",
    "make_model",
    "model_names",
    "plain20",
    "plain32",
    "plain56",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "resnet110",
]
