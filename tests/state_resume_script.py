"""Run a 10,000-client SCAFFOLD-like simulation in process mode, checkpointing every round.

Usage: python state_resume_script.py CHECKPOINT ROUNDS OUT [--pause-after R]

Resumes from CHECKPOINT when it exists; writes the final state tensors to OUT. With
``--pause-after R`` it sleeps after checkpointing round R (so a test can SIGKILL it there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from safetensors.torch import save_file

from emberfl.executors import ClientSetup, ProcessExecutor
from emberfl.simulation import Simulation
from fl_testkit import ControlVariates, LazyData, linear_model

POPULATION = 10_000
PER_ROUND = 100


def main() -> None:
    checkpoint, rounds, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    pause = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--pause-after" else -1
    setup = ClientSetup(LazyData(POPULATION), linear_model(), batch_size=3, seed=5)
    with Simulation(
        ControlVariates(lr=0.1),
        ProcessExecutor(setup, num_parallels=2),
        num_clients=POPULATION,
        clients_per_round=PER_ROUND,
    ) as sim:
        if checkpoint.exists():
            sim.load_checkpoint(checkpoint)
            print(f"resumed at round {sim.round}", flush=True)
        while sim.round < rounds:
            sim.run_round()
            sim.save_checkpoint(checkpoint)
            store = sim.client_state
            assert store is not None
            print(
                f"round {sim.round} clients {len(store)} bytes {store.allocated_bytes}", flush=True
            )
            if sim.round == pause:
                time.sleep(600)
        save_file(sim.state_tensors(), str(out))


if __name__ == "__main__":
    main()
