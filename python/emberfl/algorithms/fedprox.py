"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

Each client minimises ``f_k(w) + (mu / 2) ||w - x||^2`` with local SGD: the proximal term
adds ``mu (w - x)`` to every step's gradient, computed from the live parameters (not from
a detached copy, which would add nothing). The server is FedAvg's. ``mu = 0`` is FedAvg,
bit for bit (the gradient is then left untouched).

Example:
    >>> FedProx(lr=0.1, mu=0.01).mu
    0.01
"""

from __future__ import annotations

from typing import Any, ClassVar

from emberfl.algorithms.base import Grads, Tree, check_positive
from emberfl.algorithms.local_sgd import LocalSGD, Terms

__all__ = ["FedProx"]


class FedProx(LocalSGD):
    """Local SGD on ``f_k(w) + (mu / 2) ||w - x||^2``; FedAvg's server.

    Attributes:
        mu: The proximal coefficient (>= 0; the paper tries 0.001 to 1).
    """

    name: ClassVar[str] = "fedprox"
    summary: ClassVar[str] = "FedAvg with a proximal term mu/2 ||w - x||^2 (Li 2020)"

    def __init__(self, *, lr: float, mu: float = 0.01, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            mu: The proximal coefficient (>= 0).
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s other options.

        Raises:
            ConfigError: For a value out of range.
        """
        super().__init__(lr=lr, **kwargs)
        self.mu = check_positive("mu", mu, allow_zero=True)

    def gradient(self, grads: Grads, params: Tree, terms: Terms) -> Grads:
        """Add ``mu (w - x)`` to each parameter's gradient."""
        if self.mu == 0:
            return grads
        x = terms.global_params
        return {
            n: None if g is None else g.add(params[n].detach() - x[n], alpha=self.mu)
            for n, g in grads.items()
        }
