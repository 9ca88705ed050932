"""Run the FL workload side by side in emberfl, BlazeFL and Flower, and compare.

Each (framework, mode, parallelism) runs as its own process, with the framework's own
Python (BlazeFL 3.0.0a1 needs Python >= 3.13, Flower's Ray backend runs on 3.12), on the
same data (generated once here with emberfl and saved under the results directory), the
same model initialisation, hyper-parameters and PyTorch intra-op thread count. The runs
are interleaved (all frameworks at one setting, then the next setting, repeated
``--repeats`` times) so that load from other jobs on the machine hits everyone alike.

Usage:
    python benches/side_by_side.py --setup-peers            # once: the peers' venvs
    python benches/side_by_side.py --preset small           # all frameworks, modes, P=1,2
    python benches/side_by_side.py --preset paper --model resnet18 --parallelism 1,2,4,8
    python benches/side_by_side.py --preset small --frameworks emberfl --modes process

Writes ``<results>/side_by_side-<preset>-<model>.json`` (every run's record, medians,
ratios, errors), a ``.md`` table and a ``.png`` chart (time vs parallelism per mode per
framework), prints the JSON and one ``SUMMARY`` line: emberfl's speed-up over each peer
per mode and parallelism (peer time / emberfl time; > 1 means emberfl is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))

from fl_workload import PRESETS, WorkloadConfig  # noqa: E402

from emberfl.core import StartMethod  # noqa: E402

FRAMEWORKS = ("emberfl", "blazefl", "flower")
MODES = ("serial", "thread", "process", "vectorized")  # vectorized: emberfl only; P = chunks
VENV_ROOT = Path(os.environ.get("EMBERFL_BENCH_VENVS", Path.home() / ".cache" / "emberfl-bench"))
PEERS: dict[str, dict[str, Any]] = {
    # BlazeFL 3.0.0a1 is the newest release and requires Python >= 3.13.
    "blazefl": {
        "python": "python3.13",
        "venv": "blazefl-py313",
        "requirements": ["--pre", "blazefl[contrib,reproducibility]==3.0.0a1"],
    },
    # flwr 1.42.0 pins certifi>=2026.10.19, not on PyPI when this was written; 1.41 installs.
    "flower": {
        "python": "python3.12",
        "venv": "flower-py312",
        "requirements": ["flwr[simulation]>=1.41,<1.43"],
    },
}
PYENV_PYTHONS = {
    "python3.13": "/root/.pyenv/versions/3.13.0/bin/python3.13",
    "python3.12": "/root/.pyenv/versions/3.12.1/bin/python3.12",
}


@dataclass(frozen=True)
class Run:
    """One process to start: a framework in one mode at one parallelism."""

    framework: str
    mode: str
    parallelism: int
    repeat: int

    @property
    def name(self) -> str:
        """A file-name-safe label."""
        return f"{self.framework}-{self.mode}-P{self.parallelism}-r{self.repeat}"


def _torch_requirement() -> str:
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def _find_python(name: str) -> str:
    candidate = PYENV_PYTHONS.get(name)
    if candidate and Path(candidate).exists():
        return candidate
    from shutil import which

    found = which(name)
    if found is None:
        raise SystemExit(f"{name} not found (needed for a peer's venv); install it first")
    return found


def peer_python(framework: str) -> Path:
    """Return the interpreter of a peer's venv (``EMBERFL_BENCH_<NAME>_PYTHON`` overrides)."""
    override = os.environ.get(f"EMBERFL_BENCH_{framework.upper()}_PYTHON")
    if override:
        return Path(override)
    return VENV_ROOT / PEERS[framework]["venv"] / "bin" / "python"


def setup_peers(frameworks: list[str]) -> None:
    """Create each peer's venv (outside the repository) with the peer and our torch.

    Installs run under ``nice`` so they do not disturb other jobs; re-running is cheap
    once the venvs exist.
    """
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    for framework in frameworks:
        if framework not in PEERS:
            continue
        spec = PEERS[framework]
        venv = VENV_ROOT / spec["venv"]
        if not (venv / "bin" / "python").exists():
            subprocess.run([_find_python(spec["python"]), "-m", "venv", str(venv)], check=True)
        cmd = [
            "nice",
            "-n",
            "10",
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            *spec["requirements"],
            _torch_requirement(),
            "numpy",
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def plan(
    frameworks: list[str], modes: list[str], parallelisms: list[int], repeats: int
) -> list[Run]:
    """Return the runs, interleaved: for each repeat and P, every mode of every framework.

    Serial mode runs at P=1 only; Flower has one mode (``ray``), run once per P.
    """
    runs: list[Run] = []
    for repeat in range(repeats):
        for p in parallelisms:
            for mode in modes:
                if mode == "serial" and p != min(parallelisms):
                    continue
                runs.extend(
                    Run(fw, mode, 1 if mode == "serial" else p, repeat)
                    for fw in frameworks
                    if fw in ("emberfl", "blazefl") and (mode != "vectorized" or fw == "emberfl")
                )
            if "flower" in frameworks:
                runs.append(Run("flower", "ray", p, repeat))
    return runs


def command(
    run: Run,
    config: WorkloadConfig,
    data_dir: Path,
    threads: int,
    out: Path,
    *,
    emberfl_eval_threads: int | None = None,
    emberfl_start_method: str | None = None,
) -> list[str]:
    """Return the command line of one run (``emberfl_*``: see ``--help``)."""
    common = [
        "--data-dir",
        str(data_dir),
        "--config-json",
        json.dumps(config.to_dict()),
        "--mode",
        run.mode,
        "--parallelism",
        str(run.parallelism),
        "--threads",
        str(threads),
        "--out",
        str(out),
    ]
    if run.framework == "emberfl":
        extra = []
        if emberfl_eval_threads is not None:
            extra += ["--evaluation-threads", str(emberfl_eval_threads)]
        if emberfl_start_method is not None:
            extra += ["--start-method", emberfl_start_method]
        return [sys.executable, str(BENCHES / "bench_emberfl.py"), *common, *extra]
    script = BENCHES / "peers" / f"{run.framework}_runner.py"
    return [str(peer_python(run.framework)), str(script), *common]


def execute(
    run: Run,
    config: WorkloadConfig,
    data_dir: Path,
    threads: int,
    runs_dir: Path,
    timeout: int,
    *,
    emberfl_eval_threads: int | None = None,
    emberfl_start_method: str | None = None,
) -> dict[str, Any]:
    """Start one run; return its record, or ``{"error": ...}`` with the log's tail."""
    out = runs_dir / f"{run.name}.json"
    log = runs_dir / f"{run.name}.log"
    if run.framework in PEERS and not peer_python(run.framework).exists():
        return {"error": f"{peer_python(run.framework)} missing; run with --setup-peers"}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("RAY_TMPDIR", "/tmp/emberfl-bench-ray")
    start = time.perf_counter()
    try:
        with log.open("w") as handle:
            proc = subprocess.run(
                command(
                    run,
                    config,
                    data_dir,
                    threads,
                    out,
                    emberfl_eval_threads=emberfl_eval_threads,
                    emberfl_start_method=emberfl_start_method,
                ),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
                check=False,
            )
        failed = proc.returncode != 0 or not out.exists()
        reason = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        failed, reason = True, f"timed out after {timeout}s"
    wall = time.perf_counter() - start
    if failed:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": reason, "log_tail": tail, "process_wall_s": wall}
    record: dict[str, Any] = json.loads(out.read_text())
    record["process_wall_s"] = wall
    return record


def _key(framework: str, mode: str, p: int) -> str:
    return f"{framework}/{mode}/P{p}"


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Return medians per setting and emberfl's speed-ups over each peer."""
    medians = {
        key: statistics.median(r["total_seconds"] for r in recs)
        for key, recs in records.items()
        if recs
    }
    steady = {
        key: statistics.median(
            statistics.mean(r["round_seconds"][1:] or r["round_seconds"]) for r in recs
        )
        for key, recs in records.items()
        if recs
    }
    speedups: dict[str, float] = {}
    steady_speedups: dict[str, float] = {}
    for key, seconds in medians.items():
        framework, mode, p = key.split("/")
        if framework != "emberfl" or seconds <= 0:
            continue
        peers = {
            "blazefl": _key("blazefl", mode, int(p[1:])),
            "flower": _key("flower", "ray", int(p[1:])),
        }
        if mode == "vectorized":  # no peer has it: compare with BlazeFL's fastest setting
            blaze = [k for k in medians if k.startswith("blazefl/")]
            peers = {"blazefl best": min(blaze, key=medians.__getitem__)} if blaze else {}
        for peer, peer_key in peers.items():
            if peer_key in medians:
                label = f"{peer} ({peer_key.split('/', 1)[1]})" if peer == "blazefl best" else peer
                speedups[f"{mode}/{p} vs {label}"] = medians[peer_key] / seconds
                steady_speedups[f"{mode}/{p} vs {label}"] = steady[peer_key] / steady[key]
    checksums: dict[str, list[str]] = {}
    for key, recs in records.items():
        if key.split("/")[1] == "vectorized":  # equal up to float rounding, not bitwise
            continue
        checksums.setdefault(key.split("/")[0], []).extend(r["checksum"] for r in recs)
    identical = {fw: len(set(sums)) == 1 for fw, sums in checksums.items()}
    return {
        "median_seconds": medians,
        "speedup": speedups,
        "later_round_seconds": steady,
        "later_round_speedup": steady_speedups,
        "checksum_identical": identical,
    }


def breakdown_table(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Return emberfl's mean per-round phase times (rounds after the first, and round 1)."""
    table: dict[str, dict[str, float]] = {}
    for key, recs in records.items():
        if not key.startswith("emberfl/") or not recs:
            continue
        rows = recs[0]["breakdown"]
        later = rows[1:] or rows
        fields = [k for k in rows[0] if k.endswith("_s")]
        table[key] = {f: statistics.mean(r[f] for r in later) for f in fields}
        table[key]["round1_overhead_s"] = rows[0]["overhead_s"]
    return table


def markdown(summary: dict[str, Any], records: dict[str, list[dict[str, Any]]]) -> str:
    """Return the results as a Markdown table."""
    lines = [
        "| framework | mode | P | total s (median) | round 1 s | later rounds s (mean) "
        "| peer total / emberfl total |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    medians = summary["median_seconds"]
    for key in sorted(medians, key=lambda k: (k.split("/")[2], k.split("/")[1], k)):
        framework, mode, p = key.split("/")
        first = statistics.median(r["round_seconds"][0] for r in records[key])
        later = statistics.median(
            statistics.mean(r["round_seconds"][1:] or r["round_seconds"]) for r in records[key]
        )
        ratio = ""
        if framework != "emberfl":
            ember = [
                f"{m} {medians[key] / medians[_key('emberfl', m, int(p[1:]))]:.2f}x"
                for m in MODES
                if _key("emberfl", m, int(p[1:])) in medians
                and (framework == "flower" or m == mode)
            ]
            ratio = ", ".join(ember)
        lines.append(
            f"| {framework} | {mode} | {p[1:]} | {medians[key]:.2f} | {first:.2f} | "
            f"{later:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path, title: str) -> None:
    """Plot time vs parallelism, one line per framework and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for key, seconds in summary["median_seconds"].items():
        framework, mode, p = key.split("/")
        series.setdefault(f"{framework} {mode}", []).append((int(p[1:]), seconds))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        xs, ys = zip(*points, strict=True)
        style = "-o" if label.startswith("emberfl") else "--s"
        ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("parallelism P (clients trained at once)")
    ax.set_ylabel("time for all rounds (s, median)")
    ax.set_yscale("log")
    ax.set_xticks(sorted({p for pts in series.values() for p, _ in pts}))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(summary: dict[str, Any], preset: str, model: str) -> str:
    """Return the one-line summary: emberfl's speed-up over each peer."""
    parts = [f"{k} {v:.2f}x" for k, v in sorted(summary["speedup"].items())]
    same = summary["checksum_identical"].get("emberfl")
    return (
        f"SUMMARY side_by_side {preset}/{model}: emberfl speed-up (peer time / emberfl time): "
        + ("; ".join(parts) or "no peer ran")
        + f"; emberfl checksums identical across modes/P: {same}"
    )


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    """Parse arguments, run the plan, write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--parallelism", default="1,2")
    parser.add_argument("--model", choices=("cnn", "resnet18"), default="cnn")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per client")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--results-dir", type=Path, default=BENCHES / "results")
    parser.add_argument("--setup-peers", action="store_true", help="create the peers' venvs")
    parser.add_argument(
        "--emberfl-evaluation-threads",
        type=int,
        help="threads emberfl's server evaluates the global model with (default: P, the "
        "run's parallelism; the peers evaluate with one)",
    )
    parser.add_argument(
        "--emberfl-start-method",
        choices=get_args(StartMethod),
        help="how emberfl's process mode starts its workers (default: emberfl's auto, "
        "which forks here)",
    )
    args = parser.parse_args()
    frameworks = _csv(args.frameworks)
    modes = _csv(args.modes)
    parallelisms = [int(p) for p in _csv(args.parallelism)]
    unknown = set(frameworks) - set(FRAMEWORKS) | set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown framework or mode: {', '.join(sorted(unknown))}")
    if args.setup_peers:
        setup_peers(frameworks)
        if len(sys.argv) == 2:
            return

    from bench_emberfl import prepare_data

    config = PRESETS[args.preset].replace(model=args.model)
    data_dir = prepare_data(config, args.results_dir / f"data-{args.preset}")
    tag = f"{args.preset}-{args.model}"
    runs_dir = args.results_dir / f"runs-{tag}"
    runs_dir.mkdir(parents=True, exist_ok=True)

    records: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, dict[str, Any]] = {}
    for run in plan(frameworks, modes, parallelisms, args.repeats):
        result = execute(
            run,
            config,
            data_dir,
            args.threads,
            runs_dir,
            args.timeout,
            emberfl_eval_threads=args.emberfl_evaluation_threads,
            emberfl_start_method=args.emberfl_start_method,
        )
        key = _key(run.framework, run.mode, run.parallelism)
        status = f"{result['total_seconds']:.2f}s" if "error" not in result else result["error"]
        print(f"[{run.name}] {status}", file=sys.stderr, flush=True)
        if "error" in result:
            errors[key] = result
            continue
        records.setdefault(key, []).append(result)

    summary = summarise(records)
    versions = {
        key.split("/")[0]: {
            "version": recs[0]["framework_version"],
            "python": recs[0]["python"],
            "torch": recs[0]["torch"],
        }
        for key, recs in records.items()
    }
    report = {
        "benchmark": "side_by_side",
        "preset": args.preset,
        "config": config.to_dict(),
        "threads_per_client": args.threads,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "versions": versions,
        **summary,
        "emberfl_breakdown": breakdown_table(records),
        "errors": errors,
        "runs": records,
    }
    out = args.results_dir / f"side_by_side-{tag}.json"
    out.write_text(json.dumps(report, indent=2))
    (args.results_dir / f"side_by_side-{tag}.md").write_text(markdown(summary, records) + "\n")
    if summary["median_seconds"]:
        chart(summary, args.results_dir / f"side_by_side-{tag}.png", f"FedAvg, {tag}")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    print(summary_line(summary, args.preset, args.model))


if __name__ == "__main__":
    main()
