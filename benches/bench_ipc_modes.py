"""BlazeFL 2.0.x's IPC modes side by side: BlazeFL 2.0.x against emberfl, same code.

Runs BlazeFL's contrib FedAvg pipeline (``benches/peers/blazefl_runner.py``) with the
process-pool trainer in ``storage`` and ``shared_memory`` IPC mode, once on BlazeFL 2.0.x
(its own virtual env, Python 3.13) and once on emberfl (``--package emberfl``: BlazeFL's
classes on emberfl, imports changed), on the shared workload (``fl_workload``), repeats
interleaved. Prints one JSON document: per configuration the median total seconds of the
timed rounds and the final model checksum, and the ratios BlazeFL / emberfl per IPC mode.

Usage:
    python benches/bench_ipc_modes.py --blazefl-python PATH [--preset small] \\
        [--parallelism 2] [--repeats 2] [--out FILE]

``PATH`` is a Python with ``blazefl==2.0.1`` (or another 2.0.x) and torch installed, e.g.
``python3.13 -m venv V && V/bin/pip install torch numpy tqdm blazefl==2.0.1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))

from fl_workload import PRESETS  # noqa: E402

IPC_MODES = ("storage", "shared_memory")


def run_one(
    python: str,
    package: str,
    ipc_mode: str,
    config_json: str,
    data_dir: Path,
    parallelism: int,
    timeout: int,
) -> dict[str, Any]:
    """Run the pipeline once and return its record."""
    with tempfile.TemporaryDirectory(prefix="ipc-bench-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [
            python,
            str(BENCHES / "peers" / "blazefl_runner.py"),
            "--data-dir",
            str(data_dir),
            "--config-json",
            config_json,
            "--mode",
            "process",
            "--parallelism",
            str(parallelism),
            "--threads",
            "1",
            "--package",
            package,
            "--ipc-mode",
            ipc_mode,
            "--out",
            str(out),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{package} {ipc_mode} failed:\n{done.stderr[-3000:]}")
        record: dict[str, Any] = json.loads(out.read_text())
        return record


def main() -> None:
    """Run the interleaved plan and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blazefl-python", required=True, help="a Python with blazefl 2.0.x")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--results-dir", type=Path, default=BENCHES / "results")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from bench_emberfl import prepare_data

    config = PRESETS[args.preset]
    data_dir = prepare_data(config, args.results_dir / f"data-{args.preset}")
    config_json = json.dumps(config.to_dict())
    pythons = {"blazefl": args.blazefl_python, "emberfl": sys.executable}
    records: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for ipc_mode in IPC_MODES:
            for package in ("blazefl", "emberfl"):
                record = run_one(
                    pythons[package],
                    package,
                    ipc_mode,
                    config_json,
                    data_dir,
                    args.parallelism,
                    args.timeout,
                )
                key = f"{package}/{ipc_mode}"
                records.setdefault(key, []).append(record)
                print(
                    f"[{repeat}] {key}: {record['total_seconds']:.2f}s "
                    f"checksum {record['checksum'][:12]}",
                    file=sys.stderr,
                    flush=True,
                )
    medians = {k: statistics.median(r["total_seconds"] for r in v) for k, v in records.items()}
    report = {
        "benchmark": "ipc_modes",
        "preset": args.preset,
        "config": config.to_dict(),
        "parallelism": args.parallelism,
        "repeats": args.repeats,
        "versions": {k.split("/")[0]: v[0]["framework_version"] for k, v in records.items()},
        "median_total_seconds": medians,
        "checksums": {k: sorted({r["checksum"] for r in v}) for k, v in records.items()},
        "blazefl_over_emberfl": {
            mode: medians[f"blazefl/{mode}"] / medians[f"emberfl/{mode}"] for mode in IPC_MODES
        },
        "emberfl_storage_over_shared_memory": medians["emberfl/storage"]
        / medians["emberfl/shared_memory"],
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
