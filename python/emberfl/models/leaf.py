"""LEAF's baseline models (Caldas et al., 2018), in PyTorch.

* :class:`FEMNISTCNN` (``"femnist-cnn"``): two 5x5 convolutions (32, 64 channels, "same"
  padding) each with ReLU and 2x2 max-pooling, a 2048-unit ReLU layer, then the classes.
* :class:`CelebACNN` (``"celeba-cnn"``): four blocks of 3x3 convolution (32 channels),
  batch normalisation, 2x2 max-pooling and ReLU, then the classes.
* :class:`SequenceLSTM`: an embedding, a two-layer LSTM and a classifier on its last
  output. ``"char-lstm"`` is LEAF's Shakespeare model (8-dimensional character embedding,
  256 hidden units); ``"word-lstm"`` LEAF's Sent140 model (100-dimensional word embedding,
  100 hidden units, a 128-unit linear layer), also used for Reddit's next word.

LEAF's Sent140 model starts from GloVe word vectors; emberfl downloads nothing, so its
embedding is learned.
"""

from __future__ import annotations

import torch
from torch import nn

from emberfl.errors import ConfigError
from emberfl.nn import LSTM

__all__ = ["CelebACNN", "FEMNISTCNN", "SequenceLSTM"]


def _image(input_shape: tuple[int, ...], model: str, minimum: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape[1:], default=0) < minimum:
        raise ConfigError(
            f"model {model!r} needs images (channels, height, width) of at least "
            f"{minimum}x{minimum}, got {input_shape}"
        )
    c, h, w = input_shape
    return int(c), int(h), int(w)


class FEMNISTCNN(nn.Module):
    """LEAF's FEMNIST CNN (6.6 M parameters at 28x28 and 62 classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the network.

        Args:
            input_shape: One image's shape ``(channels, height, width)`` (LEAF: 1x28x28).
            num_classes: The number of outputs (LEAF: 62).

        Raises:
            ConfigError: For images smaller than 4x4.
        """
        super().__init__()
        c, h, w = _image(input_shape, "femnist-cnn", 4)
        self.conv1 = nn.Conv2d(c, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


class CelebACNN(nn.Module):
    """LEAF's CelebA CNN: four conv-batchnorm-pool-ReLU blocks of 32 channels."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the network.

        Args:
            input_shape: One image's shape ``(channels, height, width)`` (LEAF: 3x84x84).
            num_classes: The number of outputs (LEAF: 2).

        Raises:
            ConfigError: For images smaller than 16x16.
        """
        super().__init__()
        c, h, w = _image(input_shape, "celeba-cnn", 16)
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [
                nn.Conv2d(c if i == 0 else 32, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                # LEAF pools with "same" padding: odd sides round up.
                nn.MaxPool2d(2, 2, ceil_mode=True),
                nn.ReLU(),
            ]
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(32 * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        logits: torch.Tensor = self.fc(torch.flatten(self.features(x), 1))
        return logits


class SequenceLSTM(nn.Module):
    """An embedding, a stacked LSTM and a classifier on the last time step.

    Attributes:
        embedding: Token ids to vectors.
        lstm: The recurrent layers (:class:`emberfl.nn.LSTM`: ``torch.nn.LSTM`` that
            :func:`torch.func.vmap` also runs).
        hidden: An optional linear layer between the LSTM and the classes.
        out: The classifier.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int,
        hidden_size: int,
        num_layers: int = 2,
        fc_size: int | None = None,
    ) -> None:
        """Build the network.

        Args:
            vocab_size: The number of token ids.
            num_classes: The number of outputs.
            embed_dim: The embedding's width.
            hidden_size: The LSTM's hidden units.
            num_layers: The LSTM's layers.
            fc_size: The width of a linear layer before the classifier (LEAF's Sent140
                model has one of 128, without activation), or ``None``.

        Raises:
            ConfigError: For a size below 1.
        """
        super().__init__()
        if min(vocab_size, num_classes, embed_dim, hidden_size, num_layers) < 1:
            raise ConfigError("SequenceLSTM's sizes must all be >= 1")
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = LSTM(embed_dim, hidden_size, num_layers)
        self.hidden = nn.Linear(hidden_size, fc_size) if fc_size else None
        self.out = nn.Linear(fc_size or hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of token-id sequences ``(N, L)``."""
        last = self.lstm(self.embedding(x))[0][:, -1]
        if self.hidden is not None:
            last = self.hidden(last)
        logits: torch.Tensor = self.out(last)
        return logits
