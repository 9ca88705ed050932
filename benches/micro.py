"""Micro-benchmarks behind the FL workload numbers, each against a baseline in the same run.

* ``aggregation``: emberfl's Rust ``weighted_mean`` on the arena vs the PyTorch idiom
  (``torch.stack`` + weighted sum) over the same client models (CNN x 100 clients,
  ResNet-18 x 10 clients).
* ``transfer``: one round of moving the global model to ``P`` worker processes and every
  client's model back. emberfl's process pool (shared-memory arena, persistent workers;
  the worker only adds 1 to the model) vs a persistent ``spawn`` process pool that pickles
  the tensors both ways (what a framework without shared memory does).
* ``rng``: emberfl's Philox streams vs NumPy's and PyTorch's generators (floats per
  second), and building a client's generator suite per ``(seed, cid, round)`` vs
  BlazeFL's ``create_rng_suite(seed)``-style seeding.
* ``overhead``: per-client framework overhead of emberfl's serial FedAvg trainer vs a bare
  PyTorch loop doing the same work (load the global model, shuffle with a seeded
  generator, SGD, flatten the result), interleaved.

Usage:
    python benches/micro.py [--only aggregation,transfer,rng,overhead] [--repeats 5]
        [--parallelism 2] [--out FILE]

Prints one JSON object and a one-line summary.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import emberfl
from emberfl.aggregation import weighted_mean
from emberfl.arena import ParamArena
from emberfl.contrib import FedAvgBaseClientTrainer, FedAvgPartitionType
from emberfl.core import ProcessPoolClientTrainer, SHMHandle, serialize_model
from emberfl.reproducibility import client_rng_suite, create_rng_suite
from emberfl.rng import stream

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fl_workload import (
    InMemoryPartitionedDataset,
    WorkloadData,
    WorkloadModelSelector,
    build_model,
    local_sgd,
)

SECTIONS = ("aggregation", "transfer", "rng", "overhead")


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Return the median seconds of ``fn`` over ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


def bench_aggregation(repeats: int) -> dict[str, Any]:
    """Weighted mean of client models: Rust on the arena vs torch.stack."""
    out: dict[str, Any] = {}
    for name, clients in (("cnn", 100), ("resnet18", 10)):
        dim = serialize_model(build_model(name, seed=0)).numel()
        arena = ParamArena.from_model({"w": torch.empty(dim)}, num_slots=clients + 1)
        gen = torch.Generator().manual_seed(0)
        for i in range(clients):
            arena.slot(i).uniform_(-1, 1, generator=gen)
        slots = list(range(clients))
        weights = [float(450 + i) for i in range(clients)]
        tensors = [arena.slot(i) for i in slots]
        w = torch.tensor(weights)
        t_rust = timeit(lambda: weighted_mean(arena, slots, weights, out=clients), repeats)  # noqa: B023
        t_torch = timeit(
            lambda: (torch.stack(tensors) * (w / w.sum())[:, None]).sum(0),  # noqa: B023
            repeats,
        )
        arena.close()
        out[name] = {
            "clients": clients,
            "dim": dim,
            "emberfl_weighted_mean_s": t_rust,
            "torch_stack_weighted_sum_s": t_torch,
            "speedup": t_torch / t_rust,
        }
    return out


# --------------------------------------------------------------------------------------------
# transfer
# --------------------------------------------------------------------------------------------


class EchoTrainer(ProcessPoolClientTrainer[Any, Any, int, Any]):
    """emberfl process pool whose clients return ``global + 1`` through shared memory."""

    def __init__(self, template: torch.Tensor, num_parallels: int) -> None:
        """Create the trainer; workers start on the first round."""
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[Any] = []
        self.stop_event = multiprocessing.get_context("spawn").Event()  # type: ignore[assignment]
        self.intra_op_threads = 1
        self.template = template

    def get_client_config(self, cid: int) -> int:
        """The config is the client id."""
        return cid

    def prepare_uplink_package_buffer(self) -> Any:
        """One flat tensor per client."""
        return {"params": torch.zeros_like(self.template)}

    @staticmethod
    def worker(
        config: int,
        payload: Any,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: Any = None,
    ) -> Any:
        """Write ``global + 1`` into the shared buffer."""
        torch.add(payload["params"], 1.0, out=shm_buffer["params"])
        return {"params": SHMHandle()}

    def uplink_package(self) -> list[Any]:
        """Return (and clear) the results."""
        packages, self.cache = self.cache, []
        return packages


def _pickle_echo(params: np.ndarray) -> np.ndarray:
    return params + np.float32(1.0)


def bench_transfer(repeats: int, parallelism: int) -> dict[str, Any]:
    """Global model to P workers and client models back: arena vs pickling."""
    out: dict[str, Any] = {}
    ctx = multiprocessing.get_context("spawn")
    for name, clients in (("cnn", 100), ("resnet18", 10)):
        template = serialize_model(build_model(name, seed=0)).clone()
        cids = list(range(clients))
        trainer = EchoTrainer(template, parallelism)
        executor = concurrent.futures.ProcessPoolExecutor(parallelism, mp_context=ctx)
        try:

            def arena_round(tr: EchoTrainer = trainer, t: torch.Tensor = template) -> None:
                tr.local_process({"params": t}, cids)  # noqa: B023
                results = tr.uplink_package()
                assert float(results[-1]["params"][0]) == float(t[0] + 1.0)

            def pickle_round(
                ex: concurrent.futures.ProcessPoolExecutor = executor,
                t: torch.Tensor = template,
            ) -> None:
                array = t.numpy()
                results = list(ex.map(_pickle_echo, [array] * len(cids)))  # noqa: B023
                assert float(results[-1][0]) == float(array[0] + np.float32(1.0))

            t_arena = timeit(arena_round, repeats)
            t_pickle = timeit(pickle_round, repeats)
        finally:
            trainer.shutdown()
            executor.shutdown()
        out[name] = {
            "clients": clients,
            "parallelism": parallelism,
            "megabytes_per_model": template.numel() * 4 / 1e6,
            "emberfl_arena_round_s": t_arena,
            "pickle_pool_round_s": t_pickle,
            "emberfl_arena_per_client_ms": 1e3 * t_arena / clients,
            "pickle_pool_per_client_ms": 1e3 * t_pickle / clients,
            "speedup": t_pickle / t_arena,
        }
    return out


# --------------------------------------------------------------------------------------------
# rng
# --------------------------------------------------------------------------------------------


def bench_rng(repeats: int) -> dict[str, Any]:
    """Random floats per second, and client generator suites per second."""
    n = 10_000_000
    s = stream(42, purpose=3, client=7, round=1)
    np_gen = np.random.default_rng(42)
    np_philox = np.random.Generator(np.random.Philox(42))
    torch_gen = torch.Generator().manual_seed(42)
    buf = torch.empty(n)
    floats = {
        "emberfl_stream": timeit(lambda: s.random(n), repeats),
        "numpy_pcg64": timeit(lambda: np_gen.random(n), repeats),
        "numpy_philox": timeit(lambda: np_philox.random(n), repeats),
        "torch_cpu": timeit(lambda: buf.uniform_(generator=torch_gen), repeats),
    }
    suites = 200
    t_client = timeit(lambda: [client_rng_suite(42, c, 3) for c in range(suites)], repeats)
    t_blaze = timeit(lambda: [create_rng_suite(42 + c) for c in range(suites)], repeats)
    return {
        "floats": n,
        "floats_per_s": {k: n / v for k, v in floats.items()},
        "emberfl_vs_numpy_pcg64": floats["numpy_pcg64"] / floats["emberfl_stream"],
        "client_suites_per_s": {
            "emberfl_client_rng_suite": suites / t_client,
            "create_rng_suite_seed_plus_cid": suites / t_blaze,
        },
    }


# --------------------------------------------------------------------------------------------
# overhead
# --------------------------------------------------------------------------------------------


def _overhead_data(clients: int, per_client: int) -> WorkloadData:
    gen = torch.Generator().manual_seed(0)
    n = clients * per_client
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    idx = [np.arange(c * per_client, (c + 1) * per_client) for c in range(clients)]
    return WorkloadData(x, y, x[:100], y[:100], idx)


def bench_overhead(repeats: int, clients: int = 20, per_client: int = 500) -> dict[str, Any]:
    """emberfl's serial FedAvg trainer vs a bare PyTorch loop, per client.

    The overhead is measured with ``fast_layers=False`` (the same PyTorch kernels as the
    bare loop); the default trainer (emberfl's max-pool kernel) is timed beside them.
    """
    torch.set_num_threads(1)
    data = _overhead_data(clients, per_client)
    dataset = InMemoryPartitionedDataset(data)
    selector = WorkloadModelSelector(seed=0)
    epochs, batch, lr = 1, 50, 0.1

    def make(fast_layers: bool) -> FedAvgBaseClientTrainer:
        return FedAvgBaseClientTrainer(
            model_selector=selector,
            model_name="cnn",
            dataset=dataset,  # type: ignore[arg-type]
            device="cpu",
            num_clients=clients,
            epochs=epochs,
            batch_size=batch,
            lr=lr,
            seed=0,
            fast_layers=fast_layers,
        )

    trainer, fast_trainer = make(False), make(True)
    global_params = serialize_model(selector.select_model("cnn"))
    payload = type("Payload", (), {"model_parameters": global_params})()
    cids = list(range(clients))
    bare_model = selector.select_model("cnn")

    def emberfl_round() -> None:
        trainer.local_process(payload, cids)  # type: ignore[arg-type]
        trainer.uplink_package()

    def fast_round() -> None:
        fast_trainer.local_process(payload, cids)  # type: ignore[arg-type]
        fast_trainer.uplink_package()

    def bare_round() -> None:
        for cid in cids:
            torch.nn.utils.vector_to_parameters(
                global_params, list(bare_model.parameters())
            )  # the CNN has no buffers: its parameters are its state
            gen = torch.Generator().manual_seed(cid)
            loader = DataLoader(
                dataset.get_dataset(FedAvgPartitionType.TRAIN, cid),
                batch_size=batch,
                shuffle=True,
                generator=gen,
            )
            local_sgd(bare_model, loader, epochs, lr)
            torch.nn.utils.parameters_to_vector(bare_model.parameters()).detach().clone()

    emberfl_round()
    fast_round()
    bare_round()
    ember_t: list[float] = []
    fast_t: list[float] = []
    bare_t: list[float] = []
    for _ in range(repeats):  # interleaved
        for fn, sink in ((emberfl_round, ember_t), (fast_round, fast_t), (bare_round, bare_t)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    e, b = statistics.median(ember_t), statistics.median(bare_t)
    f = statistics.median(fast_t)
    return {
        "clients": clients,
        "samples_per_client": per_client,
        "epochs": epochs,
        "batch_size": batch,
        "emberfl_serial_per_client_ms": 1e3 * e / clients,
        "bare_pytorch_per_client_ms": 1e3 * b / clients,
        "overhead_per_client_ms": 1e3 * (e - b) / clients,
        "overhead_fraction": (e - b) / b,
        "emberfl_serial_fast_layers_per_client_ms": 1e3 * f / clients,
        "fast_layers_speedup_vs_bare": b / f,
    }


def main() -> None:
    """Run the selected sections; print JSON and a summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    result: dict[str, Any] = {
        "benchmark": "micro",
        "emberfl_version": emberfl.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if "aggregation" in sections:
        result["aggregation"] = bench_aggregation(args.repeats)
    if "transfer" in sections:
        result["transfer"] = bench_transfer(args.repeats, args.parallelism)
    if "rng" in sections:
        result["rng"] = bench_rng(args.repeats)
    if "overhead" in sections:
        result["overhead"] = bench_overhead(args.repeats)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    parts = []
    if "aggregation" in result:
        parts += [f"agg {k} {v['speedup']:.2f}x" for k, v in result["aggregation"].items()]
    if "transfer" in result:
        parts += [f"transfer {k} {v['speedup']:.2f}x" for k, v in result["transfer"].items()]
    if "rng" in result:
        parts.append(f"rng vs numpy {result['rng']['emberfl_vs_numpy_pcg64']:.2f}x")
    if "overhead" in result:
        parts.append(f"serial overhead {100 * result['overhead']['overhead_fraction']:+.1f}%")
    print("SUMMARY micro (emberfl vs baseline, >1x = emberfl faster): " + "; ".join(parts))


if __name__ == "__main__":
    main()
