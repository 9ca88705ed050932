"""Any algorithm with its uplink compressed, with error feedback in the client state.

:class:`Compressed` wraps an algorithm: the server side and the local training are the
wrapped algorithm's, and what a client sends in the main stream (its update ``delta``) is
what a :class:`~emberfl.compression.Compressor`'s payload carries. With error feedback
the client keeps the part its payload left out, ``e_k <- e_k + Delta_k -
decode(encode(e_k + Delta_k))``, as client state (``residual``, checkpointed with the
rest), and compresses ``e_k + Delta_k`` next time it is sampled. The round's
``uplink_bytes`` counts the payloads' bytes (plus any other stream at float32).

The compressor's randomness (random-k's indices, QSGD's rounding) comes from the
client's stream ``(seed, COMPRESSION, cid, round)``, so the bits do not depend on the
mode or the parallelism. The wrapper runs in every mode its wrapped algorithm runs in: in
the vectorized mode a chunk of clients trains together, then each client's update is
encoded with its own residual and stream (:meth:`Compressed.compress_result`), within
float rounding of the per-client modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from emberfl.algorithms.base import (
    Aggregate,
    Algorithm,
    Client,
    ClientResult,
    ModelLayout,
    ServerState,
    StreamSpec,
)
from emberfl.compression import Compressor
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, Stream

__all__ = ["RESIDUAL", "Compressed"]

RESIDUAL = "compression_residual"
"""The client state entry that holds the error-feedback residual ``e_k``."""


class Compressed(Algorithm):
    """``inner`` with its main uplink stream compressed by ``compressor``.

    Attributes:
        inner: The wrapped algorithm.
        compressor: The encoding of the main stream.
        error_feedback: Whether clients keep and resend what the payload left out.
    """

    name: ClassVar[str] = "compressed"
    summary: ClassVar[str] = "an algorithm with a compressed uplink"

    def __init__(
        self, inner: Algorithm, compressor: Compressor, *, error_feedback: bool = True
    ) -> None:
        """Wrap ``inner``.

        Args:
            inner: The algorithm (not personalised: its clients' own models would not see
                the compression).
            compressor: The main stream's encoding.
            error_feedback: Keep each client's residual (default) or drop it.

        Raises:
            ConfigError: A personalised algorithm.
        """
        if inner.personalised or inner.adapts:
            raise ConfigError(
                f"compression wraps algorithms with one global model; {inner.name!r} keeps "
                "per-client models"
            )
        self.inner = inner
        self.compressor = compressor
        self.error_feedback = bool(error_feedback)

    @property
    def vectorizable(self) -> bool:  # type: ignore[override]
        """Whether the wrapped algorithm runs vectorized (the payloads are then encoded
        client by client after each chunk)."""
        return bool(self.inner.vectorizable)

    # -- the wrapped algorithm's side ---------------------------------------------------
    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """The wrapped algorithm's streams."""
        return self.inner.uplink_streams(layout)

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The wrapped algorithm's state, and the residual with error feedback."""
        state = dict(self.inner.client_state(layout))
        if self.error_feedback:
            state[RESIDUAL] = self.uplink_streams(layout)[self.main_stream].dim
        return state

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """The wrapped algorithm's server state."""
        return self.inner.init_server(model, layout)

    def broadcast(self, state: ServerState) -> dict[str, torch.Tensor]:
        """The wrapped algorithm's broadcast."""
        return self.inner.broadcast(state)

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """The wrapped algorithm's server update."""
        self.inner.server_update(state, aggregate)

    def drops(self, seed: int, cid: int, round: int) -> bool:
        """The wrapped algorithm's rule."""
        return self.inner.drops(seed, cid, round)

    def describe(self) -> str:
        """Return ``"inner(...) + compressor(...)"``."""
        feedback = "" if self.error_feedback else ", no error feedback"
        return f"{self.inner.describe()} + {self.compressor.describe()}{feedback}"

    # -- the client ---------------------------------------------------------------------
    def client_update(self, client: Client) -> ClientResult:
        """Train as the wrapped algorithm does, then send the compressed update."""
        state = client.state
        residual = state.get(RESIDUAL) if self.error_feedback else None
        client.state = {k: v for k, v in state.items() if k != RESIDUAL}
        try:
            result = self.inner.client_update(client)
        finally:
            client.state = state
        return self.compress_result(result, residual, lambda: client.stream(Purpose.COMPRESSION))

    def compress_result(
        self,
        result: ClientResult,
        residual: torch.Tensor | None,
        compression_stream: Callable[[], Stream],
    ) -> ClientResult:
        """Replace ``result``'s main stream by what its compressed payload decodes to.

        Args:
            result: The wrapped algorithm's result (changed in place).
            residual: The client's error-feedback residual (updated in place), or
                ``None`` without error feedback.
            compression_stream: Makes the client's stream ``(seed, COMPRESSION, cid,
                round)`` afresh (the encoder and the decoder each draw from its start).

        Returns:
            ``result``, with ``uplink_bytes`` set to the payload's length (plus the other
            streams' float32 size).
        """
        name = self.main_stream
        delta = result.uplink[name].detach().to("cpu", torch.float32).reshape(-1)
        value = delta if residual is None else delta + residual.to(torch.float32)
        payload = self.compressor.encode(value, compression_stream())
        sent = self.compressor.decode(payload, value.numel(), compression_stream())
        if residual is not None:
            residual.copy_(value - sent)
        result.uplink[name] = sent
        others = sum(4 * t.numel() for n, t in result.uplink.items() if n != name)
        result.uplink_bytes = len(payload) + others
        return result
