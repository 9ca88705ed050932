"""Soak test of the process mode under faults: memory and descriptors stay flat.

Runs FedAvg in process mode for ``--rounds`` rounds back to back, with a fault injected
every ``--every`` rounds, cycling through: a client that hangs (deaf to stop requests;
killed after ``client_timeout``), a worker killed by ``SIGKILL``, a client that raises, a
client that writes into the broadcast. A faulted round fails with emberfl's error and is
run again without the fault (the server state is unchanged by a failed round), so the
run ends with the same number of rounds as a clean one.

After every completed round it records the parent's resident set (RSS), the summed RSS
of its child processes (the workers), the number of children, the parent's open file
descriptors and memfds, and the emberfl entries of ``/dev/shm``. No garbage collection is
forced: a failed round's traceback must not hold on to shared memory. It also runs the
same rounds without faults in the same process and compares the final models bit for bit.

Usage:
    python benches/bench_faults_soak.py [--rounds 20] [--every 3] [--clients 8]
        [--parallelism 2] [--timeout 1.0] [--out FILE]

Prints the JSON record and one SUMMARY line: the drift of each figure between the first
faulted round and the end, and whether the final models match.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.algorithms import Client, ClientResult, FedAvg
from emberfl.errors import EmberflError
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation

FAULTS = ("hang", "kill", "raise", "write")
FEATURES, CLASSES = 16, 4


class SoakData:
    """Client ``k`` holds 32 samples generated from seed ``k`` (nothing stored)."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def get_dataset(self, type_: Any, cid: int | None) -> TensorDataset:
        g = torch.Generator().manual_seed(10_000 if cid is None else cid)
        x = torch.randn(32, FEATURES, generator=g)
        y = torch.randint(0, CLASSES, (32,), generator=g)
        return TensorDataset(x, y)

    def get_dataloader(
        self,
        type_: Any,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        data = self.get_dataset(type_, cid)
        return DataLoader(data, batch_size=batch_size or 32, shuffle=True, generator=generator)


class FaultyFedAvg(FedAvg):
    """FedAvg whose client ``target`` misbehaves as ``fault`` says (``""``: it does not)."""

    def __init__(self, *, flag: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flag = flag
        self.fault = ""
        self.target = -1

    def client_update(self, client: Client) -> ClientResult:
        if client.cid == self.target:
            if self.fault == "hang":
                while os.path.exists(self.flag):
                    time.sleep(0.01)
            elif self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "raise":
                raise RuntimeError("injected failure")
            elif self.fault == "write":
                with torch.no_grad():
                    client.broadcast["model"].mul_(2.0)
        return super().client_update(client)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _sample(round_: int, fault: str) -> dict[str, Any]:
    fds = os.listdir("/proc/self/fd")
    memfds = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            memfds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    children = _children(os.getpid())  # the workers (and a fork server, if any)
    return {
        "round": round_,
        "fault": fault,
        "parent_rss_kib": _rss_kib(os.getpid()),
        "children_rss_kib": sum(_rss_kib(p) for p in children),
        "children": len(children),
        "fds": len(fds),
        "memfds": memfds,
        "shm_entries": sum("emberfl" in n for n in os.listdir("/dev/shm")),
    }


def _checksum(model: torch.Tensor) -> str:
    return hashlib.sha256(model.numpy().tobytes()).hexdigest()


def soak(args: argparse.Namespace, *, faults: bool) -> tuple[str, list[dict[str, Any]]]:
    """Run the rounds (with or without faults); return the model's checksum and samples."""
    flag = Path(tempfile.mkdtemp(prefix="emberfl-soak-")) / "hang"
    setup = ClientSetup(SoakData(args.clients), _model(), batch_size=8, seed=7)
    executor = make_executor(
        "process", setup, parallelism=args.parallelism, client_timeout=args.timeout
    )
    algorithm = FaultyFedAvg(flag=str(flag), lr=0.05)
    samples: list[dict[str, Any]] = []
    cids = list(range(args.clients))
    injected = 0
    with Simulation(algorithm, executor, num_clients=args.clients) as sim:
        for round_ in range(1, args.rounds + 1):
            fault = ""
            if faults and round_ % args.every == 0:
                fault = FAULTS[injected % len(FAULTS)]
                injected += 1
                algorithm.fault, algorithm.target = fault, cids[round_ % len(cids)]
                flag.touch()
                started = time.monotonic()
                try:
                    sim.run_round(cids)
                except EmberflError as exc:
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                else:
                    raise SystemExit(f"round {round_}: the {fault!r} fault raised nothing")
                finally:
                    flag.unlink()
                    algorithm.fault, algorithm.target = "", -1
                failed_s = time.monotonic() - started
            sim.run_round(cids)
            record = _sample(round_, fault)
            if fault:
                record["error"] = error
                record["failed_round_s"] = round(failed_s, 3)
            samples.append(record)
            print(json.dumps(record), file=sys.stderr)
        model = sim.state.model.clone()
    flag.parent.rmdir()
    return _checksum(model), samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main() -> None:
    """Run the soak with faults and without, print the record and the summary."""
    args = parse_args()
    clean, _ = soak(args, faults=False)
    faulted, samples = soak(args, faults=True)
    first = next(i for i, s in enumerate(samples) if s["fault"])
    base, last = samples[first], samples[-1]
    drift = {
        key: last[key] - base[key]
        for key in ("parent_rss_kib", "children_rss_kib", "fds", "memfds", "shm_entries")
    }
    peak = {
        key: max(s[key] for s in samples[first:])
        for key in ("parent_rss_kib", "children_rss_kib", "fds", "memfds")
    }
    record = {
        "bench": "faults_soak",
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "torch": torch.__version__,
        "faults_injected": sum(bool(s["fault"]) for s in samples),
        "rounds": samples,
        "drift_since_first_fault": drift,
        "peak_since_first_fault": peak,
        "same_model_as_clean_run": clean == faulted,
        "checksum": faulted,
    }
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(
        f"SUMMARY faults={record['faults_injected']} rounds={args.rounds} "
        + " ".join(f"{k}_drift={v}" for k, v in drift.items())
        + f" same_model={record['same_model_as_clean_run']}"
    )


if __name__ == "__main__":
    main()
