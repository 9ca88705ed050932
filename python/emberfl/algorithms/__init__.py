"""Federated algorithms, each defined once and run by any executor (:mod:`emberfl.executors`).

* :mod:`~emberfl.algorithms.base` — the contract: :class:`Algorithm`, :class:`Client`,
  :class:`ClientResult`, :class:`ServerState`, :class:`Aggregate`.
* :mod:`~emberfl.algorithms.local_sgd` — :class:`LocalSGD`, the easy path for
  gradient-based algorithms (hooks for a loss term, a gradient change, what is sent up).
* One module per algorithm (:mod:`~emberfl.algorithms.fedavg`, ...); :data:`ALGORITHMS`
  is the table ``emberfl run --algorithm`` picks from.

BlazeFL-style FedAvg classes (server handler, serial / thread / process trainers) are in
:mod:`emberfl.contrib`, built on this layer.
"""

from __future__ import annotations

from emberfl.algorithms.base import (
    Aggregate,
    Algorithm,
    Client,
    ClientResult,
    ModelLayout,
    ServerState,
    Split,
    StreamSpec,
    Tree,
)
from emberfl.algorithms.compressed import Compressed
from emberfl.algorithms.ditto import Ditto
from emberfl.algorithms.fedavg import FedAvg
from emberfl.algorithms.fedbn import FedBN
from emberfl.algorithms.feddyn import FedDyn
from emberfl.algorithms.fednova import FedNova
from emberfl.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from emberfl.algorithms.fedprox import FedProx
from emberfl.algorithms.ifca import IFCA
from emberfl.algorithms.local_sgd import ClientUpdate, LocalResult, LocalSGD, Terms
from emberfl.algorithms.perfedavg import PerFedAvg
from emberfl.algorithms.qffl import QFFL
from emberfl.algorithms.scaffold import Scaffold

__all__ = [
    "ALGORITHMS",
    "Aggregate",
    "Algorithm",
    "Client",
    "ClientResult",
    "ClientUpdate",
    "Compressed",
    "Ditto",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBN",
    "FedDyn",
    "FedNova",
    "FedProx",
    "FedYogi",
    "IFCA",
    "LocalResult",
    "LocalSGD",
    "ModelLayout",
    "PerFedAvg",
    "QFFL",
    "Scaffold",
    "ServerState",
    "Split",
    "StreamSpec",
    "Terms",
    "Tree",
]

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedAdagrad,
        FedAdam,
        FedYogi,
        FedProx,
        Scaffold,
        FedDyn,
        FedNova,
        QFFL,
        Ditto,
        FedBN,
        IFCA,
        PerFedAvg,
    )
}
"""The algorithms ``emberfl run --algorithm NAME`` runs, by name (each class's ``summary``
is its line in ``--help``)."""
