"""Uplink compression of client updates, with error feedback and honest byte counts.

A :class:`Compressor` turns a client's flat update into the bytes it would send
(:meth:`Compressor.encode`) and back (:meth:`Compressor.decode`); the selection, the
quantisation and the bit packing run in emberfl's Rust kernels. What a round logs as
``uplink_bytes`` is the length of those payloads, not an estimate.

* :class:`TopK` — the ``k = ceil(ratio * d)`` entries of largest magnitude (ties to the
  lower index): ``k`` as uint32, then ``k`` uint32 indices and ``k`` float32 values.
* :class:`RandomK` — ``k`` entries chosen by the client's stream ``(seed, COMPRESSION,
  cid, round)``, which the server can replay, so only ``k`` and the ``k`` float32 values
  are sent. Unscaled (with error feedback, as Stich et al., 2018).
* :class:`QSGD` — Alistarh et al. (2017): the L2 norm (float32), then per entry a sign
  bit and a level ``floor(|x_i| (s / ||x||_2) + u_i)`` with ``u_i`` uniform from the
  client's stream (stochastic rounding, unbiased), ``1 + ceil(log2(s + 1))`` bits each.
* :class:`ScaledSign` — Karimireddy et al. (2019): ``||x||_1 / d`` (float32) and one sign
  bit per entry.

Error feedback (Stich et al., 2018; Karimireddy et al., 2019): the client keeps the part
of ``e_k + Delta_k`` that the payload did not carry, ``e_k <- e_k + Delta_k -
decode(encode(e_k + Delta_k))``, in its state, and adds it to its next update
(:class:`~emberfl.algorithms.compressed.Compressed` does this for any algorithm).

Example:
    >>> import torch
    >>> from emberfl.compression import TopK
    >>> from emberfl.rng import stream
    >>> payload = TopK(0.5).encode(torch.tensor([0.1, -2.0, 3.0, 0.0]), stream(0))
    >>> len(payload)  # k = 2: 4 + 2 * 4 + 2 * 4 bytes
    20
    >>> TopK(0.5).decode(payload, 4).tolist()
    [0.0, -2.0, 3.0, 0.0]
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod

import numpy as np
import torch

from emberfl import _core
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.rng import Stream

__all__ = ["COMPRESSORS", "QSGD", "Compressor", "RandomK", "ScaledSign", "TopK"]


def _flat(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ConfigError(f"compression_ratio must be in (0, 1], got {ratio}")
    return float(ratio)


class Compressor(ABC):
    """An encoding of flat float32 updates.

    Attributes:
        name: The CLI's name (``--compression``).
    """

    name: str = "compressor"

    @abstractmethod
    def encode(self, x: torch.Tensor, stream: Stream) -> bytes:
        """Return the payload that carries ``x`` (flat float32).

        Args:
            x: The update.
            stream: The client's stream for this round, for any randomness.
        """

    @abstractmethod
    def decode(self, payload: bytes, dim: int, stream: Stream | None = None) -> torch.Tensor:
        """Return the update ``payload`` carries (float32, ``dim`` entries).

        Args:
            payload: What :meth:`encode` returned.
            dim: The update's size.
            stream: The same stream :meth:`encode` saw, for rules that replay it.

        Raises:
            InvalidArgumentError: A payload of the wrong length or content.
        """

    def describe(self) -> str:
        """Return ``"name(options)"`` for logs."""
        options = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({options})"


class TopK(Compressor):
    """The ``ceil(ratio * d)`` entries of largest magnitude, with their indices.

    Attributes:
        ratio: The fraction of entries sent, in ``(0, 1]``.
    """

    name = "topk"

    def __init__(self, ratio: float) -> None:
        """Create the compressor (``ratio`` in ``(0, 1]``)."""
        self.ratio = _check_ratio(ratio)

    def k(self, dim: int) -> int:
        """Return the number of entries sent for ``dim`` entries (at least 1)."""
        return min(dim, max(1, math.ceil(self.ratio * dim)))

    def encode(self, x: torch.Tensor, stream: Stream) -> bytes:
        """Return ``k``, the ``k`` indices and the ``k`` values."""
        flat = _flat(x)
        index = _core.top_k(flat, self.k(flat.size))
        payload: bytes = struct.pack("<I", index.size) + index.tobytes() + flat[index].tobytes()
        return payload

    def decode(self, payload: bytes, dim: int, stream: Stream | None = None) -> torch.Tensor:
        """Scatter the values back to their indices."""
        if len(payload) < 4:
            raise InvalidArgumentError("a top-k payload holds at least its count")
        (k,) = struct.unpack_from("<I", payload)
        if len(payload) != 4 + 8 * k:
            raise InvalidArgumentError(
                f"a top-k payload of {k} entries has {4 + 8 * k} bytes, got {len(payload)}"
            )
        index = np.frombuffer(payload, dtype="<u4", count=k, offset=4).astype(np.int64)
        values = np.frombuffer(payload, dtype="<f4", count=k, offset=4 + 4 * k)
        if k and int(index.max()) >= dim:
            raise InvalidArgumentError(f"a top-k index {int(index.max())} is beyond {dim}")
        out = torch.zeros(dim, dtype=torch.float32)
        out[torch.from_numpy(index)] = torch.from_numpy(values.copy())
        return out


class RandomK(TopK):
    """``ceil(ratio * d)`` entries chosen by the client's stream; only the values are sent.

    Attributes:
        ratio: The fraction of entries sent, in ``(0, 1]``.
    """

    name = "randk"

    def _index(self, dim: int, stream: Stream) -> np.ndarray:
        return np.sort(stream.choice(dim, self.k(dim)))

    def encode(self, x: torch.Tensor, stream: Stream) -> bytes:
        """Return ``k`` and the ``k`` values at the stream's indices."""
        flat = _flat(x)
        index = self._index(flat.size, stream)
        values: bytes = flat[index].tobytes()
        return struct.pack("<I", index.size) + values

    def decode(self, payload: bytes, dim: int, stream: Stream | None = None) -> torch.Tensor:
        """Replay the stream's indices and scatter the values to them."""
        if stream is None:
            raise InvalidArgumentError("random-k decodes with the client's stream")
        if len(payload) < 4:
            raise InvalidArgumentError("a random-k payload holds at least its count")
        (k,) = struct.unpack_from("<I", payload)
        if k != self.k(dim) or len(payload) != 4 + 4 * k:
            raise InvalidArgumentError(f"a random-k payload of {dim} entries has k={self.k(dim)}")
        values = np.frombuffer(payload, dtype="<f4", count=k, offset=4)
        out = torch.zeros(dim, dtype=torch.float32)
        out[torch.from_numpy(self._index(dim, stream))] = torch.from_numpy(values.copy())
        return out


class QSGD(Compressor):
    """QSGD with ``levels`` levels: the L2 norm and, per entry, a sign and a level.

    Attributes:
        levels: ``s`` (>= 1).
    """

    name = "qsgd"

    def __init__(self, levels: int = 16) -> None:
        """Create the compressor (``levels`` >= 1)."""
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels < 2**31:
            raise ConfigError(f"qsgd_levels must be an integer >= 1, got {levels!r}")
        self.levels = levels

    def encode(self, x: torch.Tensor, stream: Stream) -> bytes:
        """Return the norm and the packed signs and levels."""
        flat = _flat(x)
        norm, packed = _core.qsgd_encode(flat, self.levels, stream.random(flat.size))
        return struct.pack("<f", norm) + packed

    def decode(self, payload: bytes, dim: int, stream: Stream | None = None) -> torch.Tensor:
        """Return ``norm * sign * level / s`` per entry."""
        if len(payload) < 4:
            raise InvalidArgumentError("a QSGD payload holds at least its norm")
        (norm,) = struct.unpack_from("<f", payload)
        return torch.from_numpy(_core.qsgd_decode(norm, payload[4:], dim, self.levels))


class ScaledSign(Compressor):
    """The signs of the entries, scaled by their mean magnitude ``||x||_1 / d``."""

    name = "sign"

    def encode(self, x: torch.Tensor, stream: Stream) -> bytes:
        """Return the scale and one sign bit per entry."""
        flat = _flat(x)
        if not np.isfinite(flat).all():
            raise InvalidArgumentError("sign: compress finite updates only")
        scale = float(np.abs(flat.astype(np.float64)).sum() / max(flat.size, 1))
        signs = np.signbit(flat).astype(np.uint32)
        return struct.pack("<f", scale) + _core.pack_bits(signs, 1)

    def decode(self, payload: bytes, dim: int, stream: Stream | None = None) -> torch.Tensor:
        """Return ``+-scale`` per entry."""
        if len(payload) < 4:
            raise InvalidArgumentError("a sign payload holds at least its scale")
        (scale,) = struct.unpack_from("<f", payload)
        signs = _core.unpack_bits(payload[4:], dim, 1).astype(np.float32)
        return torch.from_numpy(scale * (1.0 - 2.0 * signs))


COMPRESSORS = ("none", "topk", "randk", "qsgd", "sign")
"""The compressors by name (``--compression``)."""
