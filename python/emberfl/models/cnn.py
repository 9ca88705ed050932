"""Convolutional networks for small images.

* :class:`TutorialCNN`: the two-convolution network of the PyTorch CIFAR-10 tutorial
  ("Training a classifier"), generalised to any channel count, image size and class count.
* :class:`SmallCNN`: two 3x3 convolution blocks and a small classifier; fast on CPU and
  accurate on 8x8 UCI digits, 28x28 MNIST-style and 32x32 CIFAR-style images alike.
"""

from __future__ import annotations

import torch
from torch import nn

from emberfl.errors import ConfigError

__all__ = ["SmallCNN", "TutorialCNN"]


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(
            f"model {model!r} needs images of shape (channels, height, width), got {input_shape}"
        )
    c, h, w = input_shape
    return int(c), int(h), int(w)


class TutorialCNN(nn.Module):
    """The PyTorch tutorial CNN: conv5-pool-conv5-pool, then 120-84-classes dense layers.

    With ``input_shape=(3, 32, 32)`` and ten classes it is exactly the tutorial's network
    (62,006 parameters).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the network.

        Args:
            input_shape: One image's shape ``(channels, height, width)``.
            num_classes: The number of outputs.

        Raises:
            ConfigError: If the images are smaller than 16x16 (two 5x5 convolutions and two
                poolings would leave nothing).
        """
        super().__init__()
        c, h, w = _image_shape(input_shape, "cnn")
        out_h, out_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ConfigError(
                f"model 'cnn' needs images of at least 16x16 pixels, got {h}x{w}; "
                "use --model small-cnn or mlp"
            )
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


class SmallCNN(nn.Module):
    """Two blocks of 3x3 convolution, ReLU and 2x2 max-pooling (32 and 64 channels), then a
    128-unit hidden layer.

    Padding keeps the spatial size through each convolution, so 8x8 digits work (2x2 maps
    after the two poolings) as well as 28x28 (7x7) and 32x32 (8x8) images.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the network.

        Args:
            input_shape: One image's shape ``(channels, height, width)``.
            num_classes: The number of outputs.

        Raises:
            ConfigError: If the images are smaller than 4x4.
        """
        super().__init__()
        c, h, w = _image_shape(input_shape, "small-cnn")
        if h < 4 or w < 4:
            raise ConfigError(
                f"model 'small-cnn' needs images of at least 4x4 pixels, got {h}x{w}; "
                "use --model mlp"
            )
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
