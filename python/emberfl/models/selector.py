"""Build emberfl's built-in models by name, reproducibly: :class:`Models`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from emberfl.errors import ConfigError
from emberfl.models.cnn import SmallCNN, TutorialCNN
from emberfl.models.leaf import FEMNISTCNN, CelebACNN, SequenceLSTM
from emberfl.models.mlp import MLP
from emberfl.models.resnet import ResNet18
from emberfl.rng import Purpose, stream

__all__ = ["MODEL_NAMES", "TOKEN_MODELS", "ModelName", "Models"]


class ModelName(StrEnum):
    """The models :class:`Models` builds."""

    CNN = "cnn"
    """The PyTorch CIFAR-10 tutorial CNN (:class:`~emberfl.models.cnn.TutorialCNN`)."""
    SMALL_CNN = "small-cnn"
    """A small two-block CNN (:class:`~emberfl.models.cnn.SmallCNN`)."""
    MLP = "mlp"
    """Two hidden layers of 200 units (:class:`~emberfl.models.mlp.MLP`)."""
    RESNET18 = "resnet18"
    """CIFAR-style ResNet-18 (:class:`~emberfl.models.resnet.ResNet18`)."""
    LOGREG = "logreg"
    """Multinomial logistic regression: one linear layer (an :class:`~emberfl.models.mlp.MLP`
    without hidden layers), FedProx's model for its synthetic data."""
    FEMNIST_CNN = "femnist-cnn"
    """LEAF's FEMNIST CNN (:class:`~emberfl.models.leaf.FEMNISTCNN`)."""
    CELEBA_CNN = "celeba-cnn"
    """LEAF's CelebA CNN (:class:`~emberfl.models.leaf.CelebACNN`)."""
    CHAR_LSTM = "char-lstm"
    """LEAF's Shakespeare LSTM: 8-dim embedding, 2 x 256 LSTM
    (:class:`~emberfl.models.leaf.SequenceLSTM`); takes token ids."""
    WORD_LSTM = "word-lstm"
    """LEAF's Sent140 LSTM: 100-dim embedding, 2 x 100 LSTM, a 128-unit layer
    (:class:`~emberfl.models.leaf.SequenceLSTM`); takes token ids."""


TOKEN_MODELS = frozenset({ModelName.CHAR_LSTM, ModelName.WORD_LSTM})
"""The models whose inputs are token ids (they need ``vocab_size``)."""


MODEL_NAMES: tuple[str, ...] = tuple(m.value for m in ModelName)
"""The names :meth:`Models.select_model` accepts."""


@dataclass(frozen=True)
class Models:
    """A :class:`~emberfl.core.ModelSelector` for the built-in models.

    Every model it returns starts from the same weights for a given ``(seed, name)``: they
    are drawn from the emberfl stream ``(seed, purpose=MODEL_INIT)``, so the server and
    every client (thread or process) agree, and a resumed run rebuilds the same model. It
    is a small frozen dataclass, so it pickles cheaply to worker processes.

    Attributes:
        input_shape: One sample's shape, e.g. ``(1, 8, 8)`` or ``(3, 32, 32)``.
        num_classes: The number of outputs.
        seed: The experiment seed.
        hidden_sizes: The hidden widths of ``"mlp"``.
        vocab_size: For inputs of token ids (:data:`TOKEN_MODELS`): the number of ids;
            ``None`` for numeric inputs.

    Example:
        >>> models = Models(input_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> net = models.select_model("small-cnn")
        >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """

    input_shape: tuple[int, ...]
    num_classes: int
    seed: int = 0
    hidden_sizes: tuple[int, ...] = (200, 200)
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        """Check the shape and class count.

        Raises:
            ConfigError: If ``num_classes < 1`` or a dimension of ``input_shape`` is < 1.
        """
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be at least 1, got {self.vocab_size}")
        if not self.input_shape or min(self.input_shape) < 1:
            raise ConfigError(f"input_shape must be non-empty and positive, got {self.input_shape}")

    def select_model(self, model_name: ModelName | str) -> nn.Module:
        """Return a freshly initialised model.

        The weights are drawn while PyTorch's global CPU generator is temporarily seeded
        from the model-init stream (:func:`torch.random.fork_rng`), and the generator is
        restored afterwards. Call it from one thread at a time.

        Args:
            model_name: One of :data:`MODEL_NAMES`.

        Returns:
            The model, on the CPU, in training mode.

        Raises:
            ConfigError: For an unknown name, or an input shape the model cannot take.
        """
        try:
            name = ModelName(model_name)
        except ValueError:
            raise ConfigError(
                f"unknown model {str(model_name)!r}; choose one of: {', '.join(MODEL_NAMES)}"
            ) from None
        tokens = self.vocab_size is not None
        if (name in TOKEN_MODELS) != tokens:
            if tokens:
                raise ConfigError(
                    f"model {name.value!r} takes numbers, but the inputs are token ids: use "
                    f"{' or '.join(sorted(m.value for m in TOKEN_MODELS))}"
                )
            raise ConfigError(
                f"model {name.value!r} takes token ids, but the inputs are numbers (no vocab_size)"
            )
        init_seed = stream(self.seed, purpose=Purpose.MODEL_INIT).torch_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return _build(
                name, self.input_shape, self.num_classes, self.hidden_sizes, self.vocab_size
            )


def _build(
    name: ModelName,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...],
    vocab_size: int | None,
) -> nn.Module:
    if vocab_size is not None:
        if name is ModelName.CHAR_LSTM:
            return SequenceLSTM(vocab_size, num_classes, embed_dim=8, hidden_size=256)
        return SequenceLSTM(vocab_size, num_classes, embed_dim=100, hidden_size=100, fc_size=128)
    if name is ModelName.FEMNIST_CNN:
        return FEMNISTCNN(input_shape, num_classes)
    if name is ModelName.CELEBA_CNN:
        return CelebACNN(input_shape, num_classes)
    if name is ModelName.CNN:
        return TutorialCNN(input_shape, num_classes)
    if name is ModelName.SMALL_CNN:
        return SmallCNN(input_shape, num_classes)
    if name is ModelName.MLP:
        return MLP(input_shape, num_classes, hidden=tuple(hidden))
    if name is ModelName.LOGREG:
        return MLP(input_shape, num_classes, hidden=())
    return ResNet18(input_shape, num_classes)
