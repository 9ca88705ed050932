"""Ditto (Li et al., 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization").

Every client keeps a personal model ``v_k`` (client state, the global model the first
time it trains) besides taking part in FedAvg. In a round, client ``k``:

1. trains the global model ``x`` with local SGD, as FedAvg does, and sends
   ``delta_k = y_k - x`` (the server is FedAvg's);
2. trains its personal model on ``f_k(v) + (lambda / 2) ||v - x||^2`` for the same number
   of local epochs, from ``v_k``, with the global model ``x`` of the round as the anchor,
   and keeps the result.

The global model is FedAvg's, bit for bit: the personal pass runs after the global one
and sends nothing. ``lambda`` trades personalisation (small) for the global model's
robustness (large); the paper tries values from 0.01 to 2. Personal models are evaluated
on each client's own test split (:meth:`personal_model`).

Not vectorizable: each client trains two models in sequence.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import Client, ClientResult, ModelLayout, ServerState, check_positive
from emberfl.algorithms.fedprox import FedProx
from emberfl.algorithms.local_sgd import LocalSGD, train_locally

__all__ = ["Ditto"]


class Ditto(LocalSGD):
    """FedAvg plus a personal model per client, pulled towards the global one.

    Attributes:
        lam: ``lambda``, the personal models' proximal coefficient (>= 0).
    """

    name: ClassVar[str] = "ditto"
    summary: ClassVar[str] = "personal models pulled towards FedAvg's global model (Li 2021)"
    vectorizable: ClassVar[bool] = False
    personalised: ClassVar[bool] = True

    def __init__(self, *, lr: float, lam: float = 0.1, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0), for both models.
            lam: ``lambda`` (>= 0).
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s other options.

        Raises:
            ConfigError: For a value out of range.
        """
        super().__init__(lr=lr, **kwargs)
        self.lam = check_positive("lam", lam, allow_zero=True)

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The personal model ``v_k``."""
        return {"personal": layout.dim}

    def personal_model(
        self, state: dict[str, torch.Tensor], server: ServerState, layout: ModelLayout
    ) -> torch.Tensor | None:
        """Return the client's personal model (flat) from its state."""
        return state["personal"]

    def client_update(self, client: Client) -> ClientResult:
        """Train the global model (sent up), then the personal one (kept)."""
        result, metrics = train_locally(self, client)
        x = result.global_model
        personal = client.state["personal"]
        # The personal objective is FedProx's, anchored at this round's global model.
        anchored = FedProx(
            lr=self.lr,
            epochs=self.epochs,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            optimizer=self.local_optimizer,
            mu=self.lam,
            stragglers=self.stragglers,
            **({"adam_betas": self.adam_betas, "adam_eps": self.adam_eps}
               if self.local_optimizer == "adam" else {}),
        )  # fmt: skip
        start = None if client.state_is_new else personal.to(torch.float32)
        trained, _ = train_locally(anchored, client, start=start)
        personal.copy_(trained.model)
        return ClientResult(
            uplink={"delta": result.model - x},
            num_samples=client.num_samples,
            metrics=metrics,
        )
