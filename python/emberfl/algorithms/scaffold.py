"""SCAFFOLD, option II (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning").

Client ``k`` keeps a control variate ``c_k`` (client state, zeros at first); the server
keeps ``c`` (server state, zeros) and broadcasts it with the model. Every local step uses
the corrected gradient ``g - c_k + c``. After ``tau_k`` steps with learning rate ``eta``:
``c_k+ = c_k - c + (x - y_k) / (tau_k eta)``; the client sends ``delta_k = y_k - x`` and
``dc_k = c_k+ - c_k`` and keeps ``c_k+``. The server applies
``x <- x + eta_g mean_k delta_k`` and ``c <- c + (m / N) mean_k dc_k`` (plain means over
the ``m`` sampled clients, ``N`` the federation's size).

With ``c = c_k = 0`` the first round is FedAvg with uniform weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from emberfl.algorithms.base import Aggregate, Grads, ModelLayout, ServerState, StreamSpec, Tree
from emberfl.algorithms.local_sgd import ClientUpdate, LocalResult, LocalSGD, Terms

__all__ = ["Scaffold"]


class Scaffold(LocalSGD):
    """SCAFFOLD with option II's control-variate update."""

    name: ClassVar[str] = "scaffold"
    summary: ClassVar[str] = "SCAFFOLD, option II: control variates correct client drift (2020)"
    # option II's control variate (x - y_k) / (tau_k eta) assumes SGD steps.
    optimizers: ClassVar[tuple[str, ...]] = ("sgd",)

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """``delta`` and ``dc``, both plain means over the sampled clients."""
        return {"delta": StreamSpec(layout.dim, "uniform"), "dc": StreamSpec(layout.dim, "uniform")}

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The client's control variate ``c``."""
        return {"c": layout.dim}

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return the model and the server's control variate ``c = 0``."""
        state = super().init_server(model, layout)
        state.tensors["c"] = torch.zeros(layout.dim)
        return state

    def broadcast(self, state: ServerState) -> dict[str, torch.Tensor]:
        """Send the model and ``c``."""
        return {"model": state.model, "c": state.tensors["c"]}

    def gradient(self, grads: Grads, params: Tree, terms: Terms) -> Grads:
        """Return ``g - c_k + c``."""
        ck, c = terms.state["c"], terms.server["c"]
        return {n: None if g is None else g.sub(ck[n]).add_(c[n]) for n, g in grads.items()}

    def finish(self, result: LocalResult) -> ClientUpdate:
        """Compute ``c_k+``; send ``delta`` and ``dc``, keep ``c_k+``."""
        x, y = result.global_model, result.model
        ck, c = result.state["c"], result.server["c"]
        steps = torch.as_tensor(result.steps, dtype=torch.float32)
        # A client that took no step moved nowhere: its variate stays as it was.
        c_new = torch.where(steps > 0, ck - c + (x - y) / (steps.clamp(min=1) * result.lr), ck)
        return ClientUpdate(uplink={"delta": y - x, "dc": c_new - ck}, state={"c": c_new})

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``x <- x + eta_g mean(delta)`` and ``c <- c + (m / N) mean(dc)``."""
        state.model.add_(aggregate.mean("delta"), alpha=self.server_lr)
        state.tensors["c"].add_(aggregate.mean("dc"), alpha=aggregate.count / aggregate.population)
