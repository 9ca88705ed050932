"""Model selection by name, as in BlazeFL: one object builds every model an experiment uses."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol, TypeVar

import torch

__all__ = ["ModelSelector"]

ModelName = TypeVar("ModelName", bound=StrEnum, contravariant=True)


class ModelSelector(Protocol[ModelName]):
    """Build a fresh :class:`torch.nn.Module` from a model name.

    ``ModelName`` is a :class:`enum.StrEnum` of the names the selector knows. Selectors are
    sent to worker processes in process-pool mode, so keep them picklable (no lambdas or
    open files as attributes).
    """

    def select_model(self, model_name: ModelName) -> torch.nn.Module:
        """Return a new model instance.

        Args:
            model_name: Which model to build.

        Returns:
            A freshly constructed model.
        """
        ...
