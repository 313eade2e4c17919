"""ResNet-18 with torchvision's module names, so state dicts match LeRobot's checkpoints.

LeRobot builds its image backbones from `torchvision.models.resnet18`; PyPI's torchvision
does not import beside the CPU torch build robotrain targets, and only these few dozen lines
are needed. Module names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`layer4.1.downsample.1`, `fc`), and the normalization layer is chosen per policy:

- `frozen_bn`: torchvision's FrozenBatchNorm2d (ACT): buffers weight/bias/running_mean/
  running_var, no `num_batches_tracked`, statistics never updated;
- `group_norm`: GroupNorm with `num_channels // 16` groups (Diffusion Policy's
  `use_group_norm=True` replacement), parameters weight/bias;
- `batch_norm`: plain BatchNorm2d.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (torchvision.ops.misc)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "group_norm":
        return lambda channels: nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    if kind == "batch_norm":
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm {kind!r}; use frozen_bn, group_norm or batch_norm")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm: Callable[[int], nn.Module],
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout. `replace_stride_with_dilation` as torchvision's
    (ACT's `replace_final_stride_with_dilation` sets it for layer4 only)."""

    def __init__(self, norm: str = "batch_norm", num_classes: int = 1000,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)):
        super().__init__()
        norm_fn = norm_layer(norm)
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_fn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._layer(64, 1, norm_fn, False)
        self.layer2 = self._layer(128, 2, norm_fn, replace_stride_with_dilation[0])
        self.layer3 = self._layer(256, 2, norm_fn, replace_stride_with_dilation[1])
        self.layer4 = self._layer(512, 2, norm_fn, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes: int, stride: int, norm: Callable[[int], nn.Module], dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        first = BasicBlock(self.inplanes, planes, stride, norm, previous_dilation)
        self.inplanes = planes
        return nn.Sequential(first, BasicBlock(planes, planes, 1, norm, self.dilation))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The layer4 feature map (what both ACT and Diffusion Policy use)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))
