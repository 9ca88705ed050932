"""A multilayer perceptron: the "2NN" of McMahan et al. (2017), for any input shape."""

from __future__ import annotations

import math

import torch
from torch import nn

from emberfl.errors import ConfigError

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then two hidden ReLU layers (200 units each by default), then the classes."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: tuple[int, ...] = (200, 200),
    ) -> None:
        """Build the network.

        Args:
            input_shape: One sample's shape, e.g. ``(1, 28, 28)``; it is flattened.
            num_classes: The number of outputs.
            hidden: The width of each hidden layer.

        Raises:
            ConfigError: If the input shape is empty or a hidden width is not positive.
        """
        super().__init__()
        in_features = math.prod(input_shape)
        if not input_shape or in_features < 1:
            raise ConfigError(f"model 'mlp' needs a non-empty input shape, got {input_shape}")
        if any(width < 1 for width in hidden):
            raise ConfigError(f"model 'mlp' needs positive hidden widths, got {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch ``(N, *input_shape)``."""
        logits: torch.Tensor = self.layers(x)
        return logits
