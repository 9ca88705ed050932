"""A small simulation for the torch.distributed tests: run under torchrun or alone.

Usage: [torchrun ... ] python distributed_script.py ALGORITHM MODE ROUNDS OUT [--broken]

Builds FedAvg or SCAFFOLD over 12 lazily generated clients (8 per round) with the given
local executor mode; under torchrun the executor is a DistributedExecutor around it. Rank 0
(or the lone process) writes the simulation's state tensors to OUT. With --broken,
client 3's loader raises (fl_testkit.BrokenData).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist
from safetensors.torch import save_file

from emberfl.algorithms import FedAvg
from emberfl.algorithms.scaffold import Scaffold
from emberfl.executors import ClientSetup, make_executor
from emberfl.executors.distributed import DistributedExecutor
from emberfl.simulation import Simulation
from fl_testkit import BrokenData, LazyData, linear_model


def main() -> None:
    algorithm_name, mode, rounds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    fail = 3 if len(sys.argv) > 5 and sys.argv[5] == "--broken" else None
    data = LazyData(12) if fail is None else BrokenData(12)
    setup = ClientSetup(data, linear_model(), batch_size=3, seed=7)
    executor = make_executor(mode, setup, parallelism=2)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        executor = DistributedExecutor(executor)
    algorithm = FedAvg(lr=0.1, epochs=2) if algorithm_name == "fedavg" else Scaffold(lr=0.1)
    try:
        with Simulation(algorithm, executor, num_clients=12, clients_per_round=8) as sim:
            for _ in range(rounds):
                sim.run_round()
            if not distributed or dist.get_rank() == 0:
                save_file(sim.state_tensors(), out)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
