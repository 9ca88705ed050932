"""ResNet-18 in its CIFAR form (He et al., 2016; the variant of kuangliu/pytorch-cifar).

Unlike the ImageNet network, the stem is a single 3x3 convolution with stride 1 and no
max-pooling, so 32x32 images keep enough resolution through the four stages. Global
average pooling before the classifier makes any image size of at least 8x8 work.
"""

from __future__ import annotations

import torch
from torch import nn

from emberfl.errors import ConfigError

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            in_planes: Input channels.
            planes: Output channels.
            stride: Stride of the first convolution (2 halves the resolution).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's output."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: stages of 64, 128, 256 and 512 channels, two blocks each."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the network.

        Args:
            input_shape: One image's shape ``(channels, height, width)``.
            num_classes: The number of outputs.

        Raises:
            ConfigError: If ``input_shape`` is not ``(C, H, W)`` or the images are smaller
                than 8x8.
        """
        super().__init__()
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ConfigError(
                f"model 'resnet18' needs images of shape (channels, height, width), "
                f"got {input_shape}"
            )
        c, h, w = (int(d) for d in input_shape)
        if h < 8 or w < 8:
            raise ConfigError(
                f"model 'resnet18' needs images of at least 8x8 pixels, got {h}x{w}; "
                "use --model small-cnn or mlp"
            )
        self.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        logits: torch.Tensor = self.linear(torch.flatten(self.pool(out), 1))
        return logits
