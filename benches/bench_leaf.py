"""What loading LEAF's FEMNIST costs: the first load's conversion and a cached load.

Writes a FEMNIST-shaped LEAF data set (``--users`` users of ``--samples`` 28x28 images
each, 100 users per JSON file as LEAF writes them, random pixels) into a temporary folder,
then loads it twice with :func:`emberfl.data.leaf.load_leaf`, each time in a fresh Python
process: the first load converts the JSON into the memory-mapped cache, the second only
maps it. Records each load's wall time, its heap peak (``tracemalloc``: Python objects and
numpy arrays; the mapped cache is page cache, not heap) and the resident memory it added,
and the size of the data as float32, as one JSON record; the SUMMARY line is
``convert_s=..,convert_heap_peak_mib=..,cached_s=..,cached_heap_peak_mib=..,data_mib=..``.

The full FEMNIST is about 3,500 users and 805,000 images (2.5 GB as float32); the peak of a
conversion grows with one JSON file (LEAF's ~100 users), not with the data set.

Usage:
    python benches/bench_leaf.py [--users 350] [--samples 230] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import write_record

_PROBE = """
import json, sys, time, tracemalloc
import torch
from emberfl.data.leaf import load_leaf
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
trace = sys.argv[2] == "trace"
if trace:
    tracemalloc.start()
t = time.perf_counter()
ds = load_leaf("femnist", sys.argv[1])
seconds = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1] if trace else None
tracemalloc.stop()
after = rss()
checksum = float(ds.train_x[::997].sum()) + int(ds.train_y.sum())
touched = rss()
print(json.dumps({"seconds": seconds, "checksum": checksum, "heap_peak": peak,
                  "rss_added": after - before, "rss_after_reading": touched - before}))
"""


def write_femnist(root: Path, users: int, samples: int, per_file: int = 100) -> int:
    """Write ``users`` FEMNIST-shaped users; return the number of training images."""
    rng = np.random.default_rng(0)
    total = 0
    for split, n in (("train", samples), ("test", max(1, samples // 9))):
        folder = root / "femnist" / split
        folder.mkdir(parents=True)
        for start in range(0, users, per_file):
            names = [f"f{u:04d}" for u in range(start, min(users, start + per_file))]
            data = {
                u: {
                    "x": np.round(rng.integers(0, 256, (n, 784)) / 255, 4).tolist(),
                    "y": rng.integers(0, 62, n).tolist(),
                }
                for u in names
            }
            blob = {"users": names, "num_samples": [n] * len(names), "user_data": data}
            (folder / f"all_data_{start // per_file}.json").write_text(json.dumps(blob))
            if split == "train":
                total += n * len(names)
    return total


def probe(target: str, *, trace: bool) -> dict[str, Any]:
    """Load in a fresh process; return its seconds, heap peak (traced: slower), the
    resident memory it added and a checksum."""
    mode = "trace" if trace else "time"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, target, mode], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=350)
    parser.add_argument("--samples", type=int, default=230, help="training images per user")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_femnist(root, args.users, args.samples)
        json_mib = sum(p.stat().st_size for p in root.rglob("*.json")) / 2**20
        first = probe(str(root), trace=False)
        shutil.rmtree(root / "femnist" / ".emberfl-cache")
        traced = probe(str(root), trace=True)
        cached = probe(str(root), trace=True)
    assert first["checksum"] == traced["checksum"] == cached["checksum"], "the cache differs"
    mib = 1 / 2**20
    fields = {
        "train_images": images,
        "json_mib": round(json_mib, 1),
        "data_mib": round(images * 784 * 4 * mib, 1),
        "convert_s": round(first["seconds"], 2),
        "convert_heap_peak_mib": round(traced["heap_peak"] * mib, 1),
        "convert_rss_added_mib": round(first["rss_added"] * mib, 1),
        "cached_s": round(cached["seconds"], 3),
        "cached_heap_peak_mib": round(cached["heap_peak"] * mib, 1),
        "cached_rss_added_mib": round(cached["rss_added"] * mib, 1),
    }
    write_record("leaf", args, **fields)
    summary = ",".join(
        f"{k}={fields[k]}"
        for k in (
            "convert_s",
            "convert_heap_peak_mib",
            "cached_s",
            "cached_heap_peak_mib",
            "data_mib",
        )
    )
    print(f"SUMMARY {summary}")


if __name__ == "__main__":
    main()
