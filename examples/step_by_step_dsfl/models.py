"""The DS-FL example's models: two small architectures and the selector that builds them.

DS-FL exchanges predictions, not parameters, so every client may run its own architecture.
:class:`DSFLModelSelector` builds either model by name and gives each *owner* (a client id,
or the server) its own initial weights, drawn from the emberfl stream
``(seed, Purpose.MODEL_INIT, client=owner)``. Models are built on PyTorch's ``meta`` device
and then initialised from that stream, so building one never touches (or advances)
PyTorch's global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import torch
from torch import nn

from emberfl.rng import Purpose, stream

__all__ = [
    "SERVER_ID",
    "DSFLModelName",
    "DSFLModelSelector",
    "DigitsCNN",
    "DigitsMLP",
    "init_parameters",
]

SERVER_ID: Final[int] = (1 << 64) - 1
"""The ``owner`` id of the server's model (no client can have it)."""


class DSFLModelName(StrEnum):
    """The architectures :class:`DSFLModelSelector` knows."""

    CNN = "cnn"
    MLP = "mlp"


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions with 2x2 max-pooling, then two linear layers.

    Attributes:
        features: The convolutional part.
        classifier: The linear part.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Create the layers (their initial values are set by :func:`init_parameters`).

        Args:
            input_shape: ``(channels, height, width)`` of one image.
            num_classes: The number of outputs.
        """
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * (height // 4) * (width // 4), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class DigitsMLP(nn.Module):
    """A two-hidden-layer perceptron on the flattened image.

    Attributes:
        layers: The network.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Create the layers (their initial values are set by :func:`init_parameters`).

        Args:
            input_shape: ``(channels, height, width)`` of one image.
            num_classes: The number of outputs.
        """
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images ``(N, C, H, W)``."""
        out: torch.Tensor = self.layers(x)
        return out


def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter of ``model`` in place, drawing only from ``generator``.

    Uses PyTorch's default rule for linear and convolutional layers (Kaiming-uniform
    weights with ``a=sqrt(5)``, biases uniform in ``+-1/sqrt(fan_in)``), in
    ``model.modules()`` order.

    Args:
        model: The model; only :class:`~torch.nn.Linear` and :class:`~torch.nn.Conv2d`
            layers may own parameters or buffers.
        generator: The CPU generator to draw from.

    Raises:
        TypeError: If another kind of module owns parameters or buffers (it would be left
            with the uninitialised memory of ``to_empty``).
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.weight[0].numel())
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            ):
                raise TypeError(
                    f"init_parameters does not know how to initialise {name or '<model>'} "
                    f"({type(module).__name__}); add a rule for it"
                )


@dataclass(frozen=True)
class DSFLModelSelector:
    """Build the example's models by name, each owner with its own initial weights.

    It implements :class:`emberfl.core.ModelSelector` and is a frozen dataclass, so it
    pickles cheaply to worker processes.

    Attributes:
        num_classes: The number of classes.
        input_shape: ``(channels, height, width)`` of one image.
        seed: The experiment seed (drives the initial weights).
    """

    num_classes: int
    input_shape: tuple[int, ...] = (1, 8, 8)
    seed: int = 0

    def select_model(self, model_name: DSFLModelName | str, *, owner: int = SERVER_ID) -> nn.Module:
        """Return a new model with owner ``owner``'s initial weights.

        Args:
            model_name: ``"cnn"`` or ``"mlp"``.
            owner: A client id, or :data:`SERVER_ID` (the default) for the server.

        Returns:
            The model, on the CPU.

        Raises:
            ValueError: For an unknown model name.
        """
        try:
            name = DSFLModelName(model_name)
        except ValueError:
            known = ", ".join(repr(m.value) for m in DSFLModelName)
            raise ValueError(f"unknown model {model_name!r}; choose one of {known}") from None
        architecture = DigitsCNN if name is DSFLModelName.CNN else DigitsMLP
        with torch.device("meta"):  # no storage, no draws from the global generator
            model = architecture(self.input_shape, self.num_classes)
        model = model.to_empty(device="cpu")
        seed = stream(self.seed, purpose=Purpose.MODEL_INIT, client=owner).torch_seed()
        init_parameters(model, torch.Generator(device="cpu").manual_seed(seed))
        return model
