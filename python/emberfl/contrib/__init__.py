"""BlazeFL's ``blazefl.contrib``: ready-made algorithms under BlazeFL's protocols.

``from emberfl.contrib import FedAvgBaseServerHandler`` and
``from emberfl.contrib.fedavg import ...`` both work, so BlazeFL code ports by renaming the
package. The classes are thin adapters of emberfl's algorithm layer
(:mod:`emberfl.algorithms`, :mod:`emberfl.executors`).
"""

from __future__ import annotations

from emberfl.contrib import fedavg
from emberfl.contrib.fedavg import (
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
from emberfl.contrib.fedavg_vectorized import (
    FedAvgVectorizedClientTrainer,
    FedAvgVectorizedServerHandler,
)

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
    "FedAvgVectorizedServerHandler",
    "fedavg",
]
