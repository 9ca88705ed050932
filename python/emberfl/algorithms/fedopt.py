"""Server optimisers: FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification") and FedAdagrad, FedAdam, FedYogi
(Reddi et al., 2021, "Adaptive Federated Optimization").

Clients run FedAvg's local SGD; the server treats the round's data-size-weighted mean
update ``delta = sum_k w_k (y_k - x)`` as a pseudo-gradient and steps with its own
optimiser, whose state (momentum ``v``; first and second moments ``m``, ``v``) is server
state, checkpointed with the model:

* FedAvgM: ``v <- beta v + delta``, ``x <- x + eta_g v``. ``beta = 0``, ``eta_g = 1`` is
  FedAvg.
* FedOpt: ``m <- beta1 m + (1 - beta1) delta``, then
  Adagrad ``v <- v + delta^2``; Adam ``v <- beta2 v + (1 - beta2) delta^2``; Yogi
  ``v <- v - (1 - beta2) delta^2 sign(v - delta^2)``; and ``x <- x + eta_g m / (sqrt(v) +
  tau)``, with ``v_0 = tau^2`` and no bias correction, as in the paper's Algorithm 2.

The server step is a few elementwise operations on the flat model in float32, in the
parent process: every execution mode gives the same bits.

Example:
    >>> FedAdam(lr=0.1).describe()  # doctest: +NORMALIZE_WHITESPACE
    'fedadam(lr=0.1, epochs=1, momentum=0.0, weight_decay=0.0, server_lr=0.1,
    local_optimizer=sgd, stragglers=0.0, drop_stragglers=False, beta1=0.9, beta2=0.99, tau=0.001)'
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import Aggregate, ModelLayout, ServerState, check_positive
from emberfl.algorithms.fedavg import FedAvg
from emberfl.errors import ConfigError

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi"]


def _check_unit(name: str, value: float, *, allow_zero: bool = True) -> float:
    value = check_positive(name, value, allow_zero=allow_zero)
    if value >= 1:
        raise ConfigError(f"{name} must be < 1, got {value}")
    return value


class FedAvgM(FedAvg):
    """FedAvg with server momentum: ``v <- beta v + delta``, ``x <- x + eta_g v``.

    Attributes:
        server_momentum: ``beta`` (Hsu et al. use 0.9 and up; 0 is FedAvg).
    """

    name: ClassVar[str] = "fedavgm"
    summary: ClassVar[str] = "FedAvg with server momentum (Hsu 2019)"

    def __init__(self, *, lr: float, server_momentum: float = 0.9, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            server_momentum: ``beta`` in ``[0, 1)``.
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s ``epochs``,
                ``momentum``, ``weight_decay`` and ``server_lr`` (default 1).

        Raises:
            ConfigError: For a value out of range.
        """
        super().__init__(lr=lr, **kwargs)
        self.server_momentum = _check_unit("server_momentum", server_momentum)

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return the model and a zero momentum buffer ``v``."""
        state = super().init_server(model, layout)
        state.tensors["server_momentum"] = torch.zeros(layout.dim)
        return state

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``v <- beta v + delta``, ``x <- x + eta_g v``."""
        v = state.tensors["server_momentum"]
        v.mul_(self.server_momentum).add_(aggregate.mean("delta"))
        state.model.add_(v, alpha=self.server_lr)


class _FedOpt(FedAvg):
    """The adaptive server optimisers' shared state and step (see the module docstring)."""

    def __init__(
        self,
        *,
        lr: float,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            server_lr: ``eta_g`` (> 0). The paper tunes it per task; the adaptive step
                is about ``eta_g`` per coordinate early on, so it is much smaller than
                FedAvg's 1.
            beta1: First-moment decay in ``[0, 1)``.
            beta2: Second-moment decay in ``[0, 1)`` (unused by FedAdagrad).
            tau: Adaptivity ``tau`` (> 0); ``v`` starts at ``tau^2``.
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s ``epochs``,
                ``momentum`` and ``weight_decay``.

        Raises:
            ConfigError: For a value out of range.
        """
        super().__init__(lr=lr, server_lr=server_lr, **kwargs)
        self.beta1 = _check_unit("beta1", beta1)
        self.beta2 = _check_unit("beta2", beta2)
        self.tau = check_positive("tau", tau)

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return the model, ``m = 0`` and ``v = tau^2``."""
        state = super().init_server(model, layout)
        state.tensors["server_m"] = torch.zeros(layout.dim)
        state.tensors["server_v"] = torch.full((layout.dim,), self.tau**2)
        return state

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update ``v`` in place from ``delta^2``."""
        raise NotImplementedError

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Update ``m`` and ``v``, then ``x <- x + eta_g m / (sqrt(v) + tau)``."""
        delta = aggregate.mean("delta")
        m, v = state.tensors["server_m"], state.tensors["server_v"]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self.second_moment(v, delta * delta)
        state.model.add_(m / (v.sqrt() + self.tau), alpha=self.server_lr)


class FedAdagrad(_FedOpt):
    """Adaptive server step with ``v <- v + delta^2``."""

    name: ClassVar[str] = "fedadagrad"
    summary: ClassVar[str] = "FedAvg with an Adagrad server optimiser (Reddi 2021)"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """``v <- v + delta^2``."""
        v.add_(delta_sq)


class FedAdam(_FedOpt):
    """Adaptive server step with ``v <- beta2 v + (1 - beta2) delta^2``."""

    name: ClassVar[str] = "fedadam"
    summary: ClassVar[str] = "FedAvg with an Adam server optimiser (Reddi 2021)"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """``v <- beta2 v + (1 - beta2) delta^2``."""
        v.mul_(self.beta2).add_(delta_sq, alpha=1 - self.beta2)


class FedYogi(_FedOpt):
    """Adaptive server step with ``v <- v - (1 - beta2) delta^2 sign(v - delta^2)``."""

    name: ClassVar[str] = "fedyogi"
    summary: ClassVar[str] = "FedAvg with a Yogi server optimiser (Reddi 2021)"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """``v <- v - (1 - beta2) delta^2 sign(v - delta^2)``."""
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1 - self.beta2)
