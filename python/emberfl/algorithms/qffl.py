"""q-FFL, as q-FedAvg (Li et al., 2020, "Fair Resource Allocation in Federated Learning").

q-FFL minimises ``sum_k p_k F_k^(q+1) / (q + 1)``: the larger ``q``, the more weight the
clients the model fits worst get, for a more uniform accuracy across clients. Client
``k`` first evaluates ``F_k``, its loss **at the global model** ``x`` (on its training
data, before training), then runs local SGD to ``y_k`` and sends, with ``L = 1 / eta``:
``delta_k = F_k^q L (x - y_k)`` and ``h_k = q F_k^(q-1) ||L (x - y_k)||^2 + L F_k^q``.
The server steps ``x <- x - sum_k delta_k / sum_k h_k``. ``q = 0`` is FedAvg with uniform
weights (``x`` becomes the plain mean of the ``y_k``).

Not vectorizable: the loss at ``x`` is a pass over the client's data before training,
which the vectorized executor does not make.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import (
    Aggregate,
    Client,
    ClientResult,
    ModelLayout,
    ServerState,
    StreamSpec,
    check_positive,
)
from emberfl.algorithms.local_sgd import LocalSGD, train_locally
from emberfl.errors import ConfigError

__all__ = ["QFFL"]


class QFFL(LocalSGD):
    """q-FedAvg: each update scaled by the client's loss to the power ``q``.

    Attributes:
        q: The fairness exponent (>= 0; the paper uses values from 0.001 to 15).
    """

    name: ClassVar[str] = "qffl"
    summary: ClassVar[str] = "q-FedAvg: fairer accuracy by weighting high-loss clients (Li 2020)"
    # q-FFL's L = 1 / eta treats the local steps as SGD's.
    optimizers: ClassVar[tuple[str, ...]] = ("sgd",)
    vectorizable: ClassVar[bool] = False
    local_dp: ClassVar[bool] = False  # it sends its loss at the global model

    def __init__(self, *, lr: float, q: float = 1.0, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0); ``L = 1 / lr``.
            q: The fairness exponent (>= 0).
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s ``epochs``,
                ``momentum`` and ``weight_decay`` (the server step is q-FFL's own: no
                ``server_lr``).

        Raises:
            ConfigError: For a value out of range, or a ``server_lr``.
        """
        if "server_lr" in kwargs:
            raise ConfigError("q-FFL's server step is its own (sum delta / sum h): no server_lr")
        super().__init__(lr=lr, **kwargs)
        self.q = check_positive("q", q, allow_zero=True)

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """``delta_k`` and ``h_k``, summed over the round's clients."""
        return {"delta": StreamSpec(layout.dim, "uniform"), "h": StreamSpec(1, "uniform")}

    def client_update(self, client: Client) -> ClientResult:
        """Evaluate ``F_k`` at the global model, train, send ``delta_k`` and ``h_k``."""
        client.load_global()
        loss = client.mean_loss()
        result, metrics = train_locally(self, client)
        big_l = 1.0 / self.lr
        dw = (result.global_model - result.model).to(torch.float64) * big_l
        if loss > 0:
            fq = loss**self.q
            h = (self.q * loss ** (self.q - 1) * float(dw.square().sum()) if self.q else 0.0) + (
                big_l * fq
            )
        else:  # a client the model fits perfectly has nothing to add
            fq, h = 0.0, 0.0
        metrics["initial_loss"] = loss
        return ClientResult(
            uplink={
                "delta": (dw * fq).to(torch.float32),
                "h": torch.tensor([h], dtype=torch.float32),
            },
            num_samples=client.num_samples,
            metrics=metrics,
        )

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``x <- x - sum(delta) / sum(h)`` (no step when every ``h_k`` is 0)."""
        total_h = float(aggregate.sum("h")[0])
        if total_h > 0:
            state.model.sub_(aggregate.sum("delta"), alpha=1.0 / total_h)
