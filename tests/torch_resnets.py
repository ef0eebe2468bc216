"""Reference ResNets in plain PyTorch, torchvision's layout (torchvision itself does not import here).

``TorchResNet`` follows ``torchvision.models.resnet`` (v1.5: the Bottleneck's
stride on its 3x3 convolution) with the same module names, hence the same
state_dict keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``). ``cifar=True`` builds He et al. 2016's CIFAR ResNets instead (3x3 stem
of 16 channels, three stages of 16/32/64, shortcut "A": every second pixel and
zero channels padded evenly on both sides, as in the paper's option A).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid}


class ShortcutA(nn.Module):
    def __init__(self, stride, extra):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x):
        half = self.extra // 2
        x = x[:, :, :: self.stride, :: self.stride]
        return functional.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, activation, residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.activation, self.residual = activation, residual

    def forward(self, x):
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.residual:
            return self.activation(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.activation(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, activation, residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.activation = activation

    def forward(self, x):
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.activation(out + identity)


class TorchResNet(nn.Module):
    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        *,
        cifar=False,
        shortcut="B",
        activation="relu",
    ):
        super().__init__()
        widths = (16, 32, 64) if cifar else (64, 128, 256, 512)
        self.inplanes = widths[0]
        self.activation = ACTIVATIONS[activation]
        if cifar:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        for i, (width, blocks) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, blocks, stride, shortcut))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, shortcut):
        layers = []
        for index in range(blocks):
            s = stride if index == 0 else 1
            downsample = None
            if shortcut != "none" and (s != 1 or self.inplanes != planes * block.expansion):
                if shortcut == "A":
                    downsample = ShortcutA(s, planes * block.expansion - self.inplanes)
                else:
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, planes * block.expansion, 1, s, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
            residual = shortcut != "none"
            layers.append(block(self.inplanes, planes, s, downsample, self.activation, residual))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.activation(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            if hasattr(self, f"layer{i}"):
                x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1))


def torch_resnet(name, num_classes=None, **kwargs):
    """``resnet18/34/50`` (torchvision, 1000 classes) or ``resnet20``, ``plain20``, ... (CIFAR, 10)."""
    if name in ("resnet18", "resnet34", "resnet50"):
        block = Bottleneck if name == "resnet50" else BasicBlock
        layers = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
        return TorchResNet(block, layers, num_classes or 1000, **kwargs)
    n = (int(name.removeprefix("resnet").removeprefix("plain")) - 2) // 6
    kwargs.setdefault("shortcut", "none" if name.startswith("plain") else "A")
    return TorchResNet(BasicBlock, (n, n, n), num_classes or 10, cifar=True, **kwargs)


def randomize_batch_norms(model, seed=0):
    """Non-trivial BN weights and running statistics (a fresh model has 1, 0, 0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.num_batches_tracked.fill_(7)
    return model


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())
