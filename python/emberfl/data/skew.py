"""Per-client changes to the data: noise-based feature skew and seeded augmentation.

* :func:`add_feature_noise`: NIID-Bench's noise-based feature skew (Li et al., 2022):
  client ``k`` of ``N`` gets Gaussian noise of standard deviation ``noise * (k + 1) / N``
  on its training inputs, drawn once from the stream ``(seed, FEATURE_NOISE, k)``.
* :class:`CropFlip`: random crop (zero padding, then a crop of the original size at a
  random offset) and horizontal flip, the augmentation of the CIFAR papers, drawn from
  the generator the client's loader shuffles with, so augmented runs are bitwise
  reproducible in every mode and for any parallelism.

An augmentation is any ``(images, generator) -> images`` callable
(:data:`Augment`): pass it as ``TensorPartitionedDataset(augment=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream

__all__ = ["Augment", "CropFlip", "add_feature_noise"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A training-batch augmentation: ``(images (B, ...), generator) -> images``."""


def add_feature_noise(
    x: torch.Tensor, client_index: Sequence[torch.Tensor], noise: float, seed: int
) -> torch.Tensor:
    """Return ``x`` with client ``k``'s rows plus ``N(0, (noise (k + 1) / N)^2)`` noise.

    Args:
        x: All training inputs ``(n, ...)`` (not modified).
        client_index: Each client's rows.
        noise: The noise level (>= 0).
        seed: The experiment seed.

    Returns:
        A new tensor.

    Raises:
        ConfigError: For a negative or non-finite ``noise``.
    """
    if not (torch.isfinite(torch.tensor(float(noise))) and noise >= 0):
        raise ConfigError(f"noise must be a number >= 0, got {noise}")
    out = x.clone()
    n = len(client_index)
    for k, rows in enumerate(client_index):
        if rows.numel() == 0 or noise == 0:
            continue
        draw = stream(seed, purpose=Purpose.FEATURE_NOISE, client=k)
        shape = (int(rows.numel()), *x.shape[1:])
        z = torch.from_numpy(draw.normal(int(torch.Size(shape).numel())).reshape(shape))
        out[rows] += (float(noise) * (k + 1) / n) * z.to(x.dtype)
    return out


@dataclass(frozen=True)
class CropFlip:
    """Random crop with ``padding`` zeros on each side, then a horizontal flip with
    probability ``flip`` (torchvision's ``RandomCrop(size, padding)`` +
    ``RandomHorizontalFlip``, on a whole batch).

    Attributes:
        padding: Zeros added on each side before cropping.
        flip: The probability of a horizontal flip.
    """

    padding: int = 4
    flip: float = 0.5

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``(B, C, H, W)``: one offset and one flip draw per image."""
        if images.dim() != 4:
            raise ConfigError(
                f"crop-and-flip augmentation needs images (B, C, H, W), got {tuple(images.shape)}"
            )
        b, _, h, w = images.shape
        p = self.padding
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
        flips = torch.rand(b, generator=generator) < self.flip
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        out = torch.empty_like(images)
        for i, (dy, dx) in enumerate(offsets.tolist()):
            crop = padded[i, :, dy : dy + h, dx : dx + w]
            out[i] = crop.flip(-1) if bool(flips[i]) else crop
        return out
