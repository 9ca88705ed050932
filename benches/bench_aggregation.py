"""Aggregation benchmark: Rust ``weighted_mean`` on the arena vs PyTorch, vs a memory copy.

K client slots of ResNet-18 size (11.7M floats) are averaged three ways, side by side in one
run: emberfl's ``weighted_mean`` (reads the arena in place), ``torch.stack(list).mean(0)``
(the usual PyTorch idiom, over the same tensors), and a plain copy of the same K x dim
bytes (``dst.copy_(src)``), the memory-bandwidth yardstick.

Usage:
    python benches/bench_aggregation.py [--slots 64] [--dim 11689512] [--repeats 5]

Prints one JSON object (median seconds of each, ratios) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import emberfl
from emberfl.aggregation import weighted_mean
from emberfl.arena import ParamArena

RESNET18_PARAMS = 11_689_512


def timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up (page faults, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--dim", type=int, default=RESNET18_PARAMS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, dim = args.slots, args.dim

    arena = ParamArena.from_model({"w": torch.empty(dim)}, num_slots=k + 1)
    g = torch.Generator().manual_seed(0)
    for i in range(k):
        arena.slot(i).uniform_(-1, 1, generator=g)
    slots = list(range(k))
    weights = [float(100 + i) for i in range(k)]
    tensors = [arena.slot(i) for i in slots]
    src = arena.tensor[:k]
    dst = torch.empty_like(src)

    t_rust = timeit(lambda: weighted_mean(arena, slots, weights, out=k), args.repeats)
    t_torch = timeit(lambda: torch.stack(tensors).mean(0), args.repeats)
    w = torch.tensor(weights)
    t_torch_w = timeit(lambda: (torch.stack(tensors) * (w / w.sum())[:, None]).sum(0), args.repeats)
    t_copy = timeit(lambda: dst.copy_(src), args.repeats)

    result = {
        "benchmark": "aggregation",
        "slots": k,
        "dim": dim,
        "bytes_read": k * dim * 4,
        "threads": args.threads,
        "emberfl_version": emberfl.__version__,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "seconds": {
            "emberfl_weighted_mean": t_rust,
            "torch_stack_mean": t_torch,
            "torch_stack_weighted_sum": t_torch_w,
            "memory_copy": t_copy,
        },
        "speedup_vs_torch_stack_mean": t_torch / t_rust,
        "speedup_vs_torch_weighted": t_torch_w / t_rust,
        "ratio_to_memory_copy": t_rust / t_copy,
        "gb_per_s": k * dim * 4 / t_rust / 1e9,
    }
    print(json.dumps(result, indent=2))
    print(
        f"SUMMARY aggregation K={k} dim={dim}: weighted_mean {t_rust * 1e3:.0f} ms, "
        f"{result['speedup_vs_torch_stack_mean']:.2f}x faster than torch.stack().mean(0), "
        f"{result['ratio_to_memory_copy']:.2f}x the time of a memory copy"
    )
    arena.close()


if __name__ == "__main__":
    main()
