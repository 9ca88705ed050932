"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization").

Clients that take different numbers of local steps pull FedAvg towards the optimum of
the clients that work most. FedNova normalises: client ``k`` sends ``d_k = delta_k / a_k``
and ``a_k``, where ``a_k = tau_k`` for plain SGD and, with momentum ``rho``,
``a_k = sum_{i < tau_k} (1 - rho^(i+1)) / (1 - rho)`` (the norm of the SGD-with-momentum
step weights). The server applies ``x <- x + eta_g tau_eff sum_k w_k d_k`` with
``tau_eff = sum_k w_k a_k`` and ``w_k = n_k / sum_j n_j`` over the sampled clients (not
``N / m`` times it, which is wrong under partial participation). With equal ``tau_k`` it
is FedAvg.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from emberfl.algorithms.base import Aggregate, ModelLayout, ServerState, StreamSpec
from emberfl.algorithms.local_sgd import ClientUpdate, LocalResult, LocalSGD

__all__ = ["FedNova", "normalizer"]


def normalizer(steps: torch.Tensor, momentum: float) -> torch.Tensor:
    """Return ``a_k`` for ``steps`` local steps with SGD momentum ``momentum``.

    ``sum_{i < tau} (1 - rho^(i+1)) / (1 - rho)`` in closed form,
    ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``; ``tau`` for ``rho = 0``.
    """
    steps = steps.to(torch.float64)
    if momentum == 0:
        return steps
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(LocalSGD):
    """Normalised averaging: each update divided by its client's number of steps."""

    name: ClassVar[str] = "fednova"
    summary: ClassVar[str] = "normalised averaging for heterogeneous local work (Wang 2020)"
    # FedNova's normaliser a_k is defined for SGD (with or without momentum).
    optimizers: ClassVar[tuple[str, ...]] = ("sgd",)

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """``delta`` (the normalised ``d_k``) and ``a`` (``a_k``), weighted by samples."""
        return {"delta": StreamSpec(layout.dim, "samples"), "a": StreamSpec(1, "samples")}

    def finish(self, result: LocalResult) -> ClientUpdate:
        """Send ``d_k = delta_k / a_k`` (zero for a client that took no step) and ``a_k``."""
        steps = torch.as_tensor(result.steps, dtype=torch.float64)
        a = normalizer(steps, self.momentum)
        delta = result.model - result.global_model
        scale = torch.where(a > 0, 1 / a.clamp(min=1e-12), torch.zeros_like(a))
        d = (delta.to(torch.float64) * scale).to(torch.float32)
        return ClientUpdate(uplink={"delta": d, "a": a.to(torch.float32).reshape(*d.shape[:-1], 1)})

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``x <- x + eta_g tau_eff mean(d)``."""
        tau_eff = float(aggregate.mean("a")[0])
        state.model.add_(aggregate.mean("delta"), alpha=self.server_lr * tau_eff)
