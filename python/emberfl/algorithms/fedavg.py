"""Federated Averaging (McMahan et al., 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data").

Each sampled client runs ``epochs`` epochs of local SGD from the global model ``x`` and
sends ``delta_k = y_k - x``; the server moves to ``x + eta_g * sum_k w_k delta_k`` with
``w_k = n_k / sum_j n_j`` (``n_k``: the client's training samples). With the default
``server_lr = 1`` that is the data-size-weighted mean of the client models, the paper's
rule. It is :class:`~emberfl.algorithms.local_sgd.LocalSGD` with no hook overridden, so it
runs in every executor, the vectorized one included.

Example:
    >>> FedAvg(lr=0.1, epochs=2).describe()  # doctest: +NORMALIZE_WHITESPACE
    'fedavg(lr=0.1, epochs=2, momentum=0.0, weight_decay=0.0, server_lr=1.0,
    local_optimizer=sgd, stragglers=0.0, drop_stragglers=False)'
"""

from __future__ import annotations

from typing import ClassVar

from emberfl.algorithms.local_sgd import LocalSGD

__all__ = ["FedAvg"]


class FedAvg(LocalSGD):
    """FedAvg: local SGD, then the data-size-weighted mean of the updates."""

    name: ClassVar[str] = "fedavg"
    summary: ClassVar[str] = "Federated Averaging (McMahan 2017): weighted mean of local SGD"
