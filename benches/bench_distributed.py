"""Time per round of ``emberfl run`` under ``torchrun`` at world sizes 1 and 2, one core each.

Runs the same experiment with ``torchrun --standalone --nproc-per-node W`` (gloo over
loopback, ``OMP_NUM_THREADS=1``, each rank's local executor ``--mode serial``) for each
world size of ``--worlds``, one after another, and reads rank 0's rows of
``metrics.jsonl``: the mean round time (rounds after the first) and where it went, its
share of the training (``train_s``), waiting for the slowest rank (``wait_s``), the
results' exchange (``exchange_s``) and the evaluation (``eval_s``, on rank 0 only). Prints
one JSON record and ``SUMMARY preset=..,speedup=..,efficiency=..``, where speedup is the
world-size-1 round time over the largest world's and efficiency the speedup per rank. The
final models of all world sizes must be the same bytes (checked).

Presets (the side-by-side workload's shapes, on synthetic CIFAR-10-shaped images, the
tutorial CNN, batch 50, lr 0.1):

* ``small``: 5,000 images over 100 clients, all of them every round, 1 local epoch;
* ``cross-device``: 20,000 images over 1,000 clients, 10 of them per round.

Usage:
    python benches/bench_distributed.py [--preset small|cross-device] [--worlds 1,2]
        [--rounds 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import write_record

PRESETS: dict[str, list[str]] = {
    "small": ["--train-size", "5000", "--num-clients", "100", "--sample-ratio", "1"],
    "cross-device": ["--train-size", "20000", "--num-clients", "1000", "--sample-ratio", "0.01"],
}
COMMON = ["--dataset", "synthetic-cifar10", "--model", "cnn", "--partition", "iid",
          "--epochs", "1", "--batch-size", "50", "--lr", "0.1", "--mode", "serial",
          "--checkpoint-every", "0", "--quiet"]  # fmt: skip
PARTS = ("train_s", "wait_s", "exchange_s", "eval_s")


def run_world(world: int, preset: str, rounds: int, out: Path) -> dict[str, Any]:
    """Run the preset at ``world`` ranks; return rank 0's mean round and its parts."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "emberfl", "run", *COMMON,
               *PRESETS[preset], "--rounds", str(rounds), "--output-dir", str(out)]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    record: dict[str, Any] = {
        "world_size": world,
        "round_s": statistics.fmean(r["round_time_s"] for r in later),
        "final_accuracy": rows[-1]["test_accuracy"],
    }
    for part in PARTS:
        record[part] = statistics.fmean(float(r[part]) for r in later)
    return record


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    results = []
    finals = set()
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            run = Path(tmp) / f"world{world}"
            results.append(run_world(world, args.preset, args.rounds, run))
            finals.add((run / "final_model.safetensors").read_bytes())
    assert len(finals) == 1, "the world sizes' final models differ"
    base, last = results[0], results[-1]
    speedup = base["round_s"] / last["round_s"]
    efficiency = speedup / (last["world_size"] / base["world_size"])
    write_record(
        "distributed",
        args,
        results=results,
        speedup=round(speedup, 3),
        efficiency=round(efficiency, 3),
        same_bytes=True,
    )
    print(f"SUMMARY preset={args.preset},speedup={speedup:.2f},efficiency={efficiency:.2f}")


if __name__ == "__main__":
    main()
