"""Federated-learning algorithms built on :mod:`emberfl.core`.

Each algorithm is a server handler, client trainers for the three execution modes and
the package dataclasses; :mod:`emberfl.contrib` re-exports them under BlazeFL's names.
"""

from __future__ import annotations

from emberfl.algorithms.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgClientConfig,
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgProcessPoolUplinkPackage,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
)
from emberfl.algorithms.fedavg_vectorized import FedAvgVectorizedClientTrainer

__all__ = [
    "FedAvgBaseClientTrainer",
    "FedAvgBaseServerHandler",
    "FedAvgClientConfig",
    "FedAvgDownlinkPackage",
    "FedAvgPartitionType",
    "FedAvgPartitionedDataset",
    "FedAvgProcessPoolClientTrainer",
    "FedAvgProcessPoolUplinkPackage",
    "FedAvgThreadPoolClientTrainer",
    "FedAvgUplinkPackage",
    "FedAvgVectorizedClientTrainer",
]
