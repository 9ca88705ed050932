"""FedDyn (Acar et al., 2021, "Federated Learning Based on Dynamic Regularization").

Client ``k`` keeps ``g_k`` (the gradient of its dynamic regulariser; client state, zeros
at first) and minimises ``f_k(w) - <g_k, w> + (alpha / 2) ||w - x||^2``: every local step
adds ``-g_k + alpha (w - x)`` to the gradient, from the live parameters. After training,
``g_k <- g_k - alpha (y_k - x)``. The server keeps ``h`` (zeros):
``h <- h - alpha (1 / N) sum_{k in S} (y_k - x)`` and ``x <- (1 / m) sum_{k in S} y_k -
h / alpha``, with plain (unweighted) means over the ``m`` sampled clients.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import (
    Aggregate,
    Grads,
    ModelLayout,
    ServerState,
    StreamSpec,
    Tree,
    check_positive,
)
from emberfl.algorithms.local_sgd import ClientUpdate, LocalResult, LocalSGD, Terms
from emberfl.errors import ConfigError

__all__ = ["FedDyn"]


class FedDyn(LocalSGD):
    """Local SGD with FedDyn's dynamic regulariser; the server corrects by ``h``.

    Attributes:
        alpha: The regularisation coefficient (> 0; the paper uses 0.1, 0.01, 0.001).
    """

    name: ClassVar[str] = "feddyn"
    summary: ClassVar[str] = "dynamic regularisation aligns local and global optima (Acar 2021)"

    def __init__(self, *, lr: float, alpha: float = 0.01, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            alpha: The regularisation coefficient (> 0).
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s ``epochs``,
                ``momentum`` and ``weight_decay`` (the server step has no learning rate:
                FedDyn's is fixed by ``alpha``).

        Raises:
            ConfigError: For a value out of range, or a ``server_lr``.
        """
        if "server_lr" in kwargs:
            raise ConfigError("FedDyn's server step is fixed by alpha: it takes no server_lr")
        super().__init__(lr=lr, **kwargs)
        self.alpha = check_positive("alpha", alpha)

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """``delta = y_k - x``, a plain mean over the sampled clients."""
        return {"delta": StreamSpec(layout.dim, "uniform")}

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The regulariser's gradient ``g_k``."""
        return {"grad": layout.dim}

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return the model and ``h = 0``."""
        state = super().init_server(model, layout)
        state.tensors["h"] = torch.zeros(layout.dim)
        return state

    def gradient(self, grads: Grads, params: Tree, terms: Terms) -> Grads:
        """Return ``g - g_k + alpha (w - x)``."""
        gk, x = terms.state["grad"], terms.global_params
        return {
            n: None if g is None else g.add(params[n].detach() - x[n], alpha=self.alpha).sub_(gk[n])
            for n, g in grads.items()
        }

    def finish(self, result: LocalResult) -> ClientUpdate:
        """Send ``delta``; keep ``g_k - alpha delta``."""
        delta = result.model - result.global_model
        return ClientUpdate(
            uplink={"delta": delta}, state={"grad": result.state["grad"] - self.alpha * delta}
        )

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``h <- h - alpha (m / N) mean(delta)``, ``x <- x + mean(delta) - h / alpha``."""
        mean = aggregate.mean("delta")
        h = state.tensors["h"]
        h.sub_(mean, alpha=self.alpha * aggregate.count / aggregate.population)
        state.model.add_(mean).sub_(h, alpha=1 / self.alpha)
