"""Flatten a model's state into one tensor and back (BlazeFL's ``serialize_model``)."""

from __future__ import annotations

import torch

from emberfl.errors import TensorMismatchError

__all__ = ["deserialize_model", "serialize_model"]


def serialize_model(model: torch.nn.Module, cpu: bool = True) -> torch.Tensor:
    """Concatenate every tensor of ``model.state_dict()`` into one flat tensor.

    The order is the state dict's order; integer buffers are promoted to the parameters'
    dtype, exactly as ``torch.cat`` does.

    Args:
        model: The model to flatten.
        cpu: Move the result to the CPU.

    Returns:
        A new 1-D tensor.
    """
    flat = torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()])
    return flat.cpu() if cpu else flat


def deserialize_model(model: torch.nn.Module, serialized_parameters: torch.Tensor) -> None:
    """Copy a tensor made by :func:`serialize_model` back into ``model``'s state, in place.

    Args:
        model: The model to overwrite.
        serialized_parameters: A flat tensor with as many elements as the model's state.

    Raises:
        TensorMismatchError: If the number of elements does not match the model.
    """
    state = model.state_dict()
    expected = sum(t.numel() for t in state.values())
    if serialized_parameters.numel() != expected:
        raise TensorMismatchError(
            f"serialized parameters have {serialized_parameters.numel()} elements, but "
            f"{type(model).__name__} has {expected} in its state dict"
        )
    flat = serialized_parameters.reshape(-1)
    offset = 0
    with torch.no_grad():
        for tensor in state.values():
            numel = tensor.numel()
            tensor.copy_(flat[offset : offset + numel].view(tensor.shape))
            offset += numel
