"""emberfl's simulation core: BlazeFL 3.0's protocols and the three execution modes.

A federated-learning algorithm is a :class:`BaseServerHandler` plus a client trainer —
:class:`BaseClientTrainer` (serial), :class:`ThreadPoolClientTrainer` or
:class:`ProcessPoolClientTrainer` — exchanging uplink and downlink packages (usually
dataclasses). Data comes from a :class:`PartitionedDataset`, models from a
:class:`ModelSelector`.
"""

from __future__ import annotations

from emberfl.core.client_trainer import (
    BaseClientTrainer,
    ClientJob,
    IPCMode,
    ProcessPoolClientTrainer,
    StartMethod,
    ThreadPoolClientTrainer,
)
from emberfl.core.intra_op import intra_op_threads
from emberfl.core.model_selector import ModelSelector
from emberfl.core.partitioned_dataset import FilteredDataset, PartitionedDataset
from emberfl.core.serialization import deserialize_model, serialize_model
from emberfl.core.server_handler import BaseServerHandler
from emberfl.core.shared_memory import (
    SHMHandle,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
)

__all__ = [
    "BaseClientTrainer",
    "BaseServerHandler",
    "ClientJob",
    "FilteredDataset",
    "IPCMode",
    "ModelSelector",
    "PartitionedDataset",
    "ProcessPoolClientTrainer",
    "SHMHandle",
    "StartMethod",
    "ThreadPoolClientTrainer",
    "deserialize_model",
    "intra_op_threads",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "serialize_model",
]
