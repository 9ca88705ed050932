"""Peak memory of ``emberfl run`` against the number of clients per round, in every mode.

Runs the issue's workload (an MLP of about 21 MB on synthetic CIFAR-10-shaped data, one
round, one epoch, batch 4, 4,000 training samples) for several client counts ``K`` and
every execution mode, each in its own process, and samples the proportional set size (PSS,
``/proc/PID/smaps_rollup``) of the whole process tree (the CLI and its worker processes)
every 20 ms. PSS counts a page shared by several processes once in total, so shared
memory (arenas, forked pages) is not counted twice. Reports the peak per run and, per
mode, the least-squares slope of peak memory against ``K`` in MB per extra client and as a
fraction of the model's size.

Usage:
    python benches/bench_memory.py [--modes serial,thread,process,vectorized]
        [--clients 20,100,200,400] [--parallelism 2] [--out FILE]

Prints the JSON record and one SUMMARY line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_PARAMS = 3 * 32 * 32 * 1700 + 1700 + 1700 * 10 + 10
"""Parameters of ``--model mlp --hidden-sizes 1700`` on 3x32x32 inputs, 10 classes."""
MODEL_BYTES = 4 * MODEL_PARAMS


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0


def run_once(mode: str, clients: int, parallelism: int, workdir: Path) -> dict[str, Any]:
    """Run the workload once and return its peak tree PSS and wall time."""
    out = workdir / f"{mode}-{clients}"
    argv = [
        sys.executable,
        "-m",
        "emberfl",
        "run",
        "--dataset",
        "synthetic-cifar10",
        "--model",
        "mlp",
        "--hidden-sizes",
        "1700",
        "--train-size",
        "4K",
        "--num-clients",
        str(clients),
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--mode",
        mode,
        "--parallelism",
        str(parallelism),
        "--checkpoint-every",
        "0",
        "--quiet",
        "--output-dir",
        str(out),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_pss_bytes(p) for p in _tree(proc.pid)))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr is not None else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} K={clients} failed ({proc.returncode}): {err[-2000:]}")
    return {"mode": mode, "clients": clients, "peak_pss_bytes": peak, "seconds": seconds}


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of ``y`` against ``x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> None:
    """Parse arguments, run every (mode, K) once, report peaks and slopes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="serial,thread,process,vectorized")
    parser.add_argument("--clients", default="20,100,200,400")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    counts = [int(k) for k in args.clients.split(",") if k]
    runs = []
    with tempfile.TemporaryDirectory(prefix="emberfl-mem-") as tmp:
        for mode in modes:
            for k in counts:
                run = run_once(mode, k, args.parallelism, Path(tmp))
                runs.append(run)
                print(
                    f"{mode} K={k}: peak {run['peak_pss_bytes'] / 2**20:.0f} MiB, "
                    f"{run['seconds']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    per_mode: dict[str, Any] = {}
    for mode in modes:
        points = [(r["clients"], r["peak_pss_bytes"]) for r in runs if r["mode"] == mode]
        fit = slope(points)
        ends = sorted(points)
        span = (ends[-1][1] - ends[0][1]) / max(1, ends[-1][0] - ends[0][0])
        per_mode[mode] = {
            "slope_bytes_per_client": fit,
            "slope_fraction_of_model": fit / MODEL_BYTES,
            "endpoint_bytes_per_client": span,
            "endpoint_fraction_of_model": span / MODEL_BYTES,
        }
    record = {
        "benchmark": "memory",
        "model_bytes": MODEL_BYTES,
        "parallelism": args.parallelism,
        "clients": counts,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "per_mode": per_mode,
    }
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    parts = [
        f"{m} {v['endpoint_fraction_of_model'] * 100:.2f}%/client" for m, v in per_mode.items()
    ]
    print(
        f"SUMMARY bench_memory K={counts[0]}..{counts[-1]} P={args.parallelism}: peak growth "
        "per extra client as a share of the model (endpoints): " + ", ".join(parts)
    )


if __name__ == "__main__":
    main()
