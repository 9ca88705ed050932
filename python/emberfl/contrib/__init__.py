"""BlazeFL's ``blazefl.contrib``: ready-made algorithms, re-exported from
:mod:`emberfl.algorithms`.

``from emberfl.contrib import FedAvgBaseServerHandler`` and
``from emberfl.contrib.fedavg import ...`` both work, so BlazeFL code ports by renaming the
package.
"""

from __future__ import annotations

from emberfl.algorithms.fedavg_vectorized import FedAvgVectorizedClientTrainer
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
    "fedavg",
]
