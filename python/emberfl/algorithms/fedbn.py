"""FedBN (Li et al., 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization").

BatchNorm layers stay with the clients: each client keeps its own BatchNorm parameters
and running statistics (client state; the global model's the first time it trains), trains
from the global model with its own BatchNorm entries in place, and sends the update of the
other entries only. The server averages those as FedAvg does; the global model's BatchNorm
entries keep their initial values. A client is judged with its own BatchNorm entries
(:meth:`FedBN.personal_model`).

On a model without BatchNorm layers FedBN is FedAvg, bit for bit. Not vectorizable: each
client starts from its own model.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from emberfl.algorithms.base import Client, ClientResult, ModelLayout, ServerState
from emberfl.algorithms.local_sgd import LocalSGD, train_locally

__all__ = ["FedBN", "batch_norm_index"]


def batch_norm_index(layout: ModelLayout) -> torch.Tensor:
    """Return the flat positions of ``layout``'s BatchNorm entries (int64, ascending)."""
    parts = [
        torch.arange(item.offset, item.offset + item.numel)
        for item in layout.items
        if item.batch_norm
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class FedBN(LocalSGD):
    """FedAvg of everything but the BatchNorm layers, which stay local."""

    name: ClassVar[str] = "fedbn"
    summary: ClassVar[str] = "FedAvg with BatchNorm layers kept local (Li 2021)"
    vectorizable: ClassVar[bool] = False
    personalised: ClassVar[bool] = True

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The client's BatchNorm entries (none for a model without BatchNorm)."""
        n = int(batch_norm_index(layout).numel())
        return {"bn": n} if n else {}

    def personal_model(
        self, state: dict[str, torch.Tensor], server: ServerState, layout: ModelLayout
    ) -> torch.Tensor | None:
        """Return the global model with the client's own BatchNorm entries."""
        if "bn" not in state:
            return None
        own = server.model.clone()
        own[batch_norm_index(layout)] = state["bn"]
        return own

    def client_update(self, client: Client) -> ClientResult:
        """Train from the global model with the client's BatchNorm entries; send the rest."""
        index = batch_norm_index(client.layout)
        x = client.broadcast["model"]
        start = None
        if index.numel() and not client.state_is_new:
            start = x.clone()
            start[index] = client.state["bn"]
        result, metrics = train_locally(self, client, start=start)
        delta = result.model - x
        if index.numel():
            client.state["bn"].copy_(result.model[index])
            delta[index] = 0.0
        return ClientResult(
            uplink={"delta": delta}, num_samples=client.num_samples, metrics=metrics
        )
