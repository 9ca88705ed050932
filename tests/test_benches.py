"""Smoke test of the side-by-side benchmark's emberfl side (no peer venvs needed).

Runs emberfl's FedAvg on the ``tiny`` workload in-process, in serial and thread-pool mode,
and checks the JSON record's fields, the per-round breakdown and that the two modes end
with the same global model; also checks the side-by-side runner's planning and summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))

import bench_emberfl  # noqa: E402
import fl_workload  # noqa: E402
import side_by_side  # noqa: E402

TINY = fl_workload.PRESETS["tiny"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny workload's data, generated once."""
    return bench_emberfl.prepare_data(TINY, tmp_path_factory.mktemp("data"))


def test_data_is_the_workload(data_dir: Path) -> None:
    """The saved data have the configured sizes and one non-empty split per client."""
    data = fl_workload.load_workload_data(data_dir)
    assert tuple(data.train_x.shape) == (TINY.num_train, 3, 32, 32)
    assert tuple(data.test_x.shape) == (TINY.num_test, 3, 32, 32)
    assert data.num_clients == TINY.num_clients
    assert sum(len(i) for i in data.client_indices) == TINY.num_train
    lazy = fl_workload.LazyPartitionedDataset(data_dir)
    eager = fl_workload.InMemoryPartitionedDataset(data)
    for cid in range(TINY.num_clients):
        a, b = lazy.get_dataset("train", cid), eager.get_dataset("train", cid)
        assert len(a) == len(b) > 0
        assert bool((a[0][0] == b[0][0]).all())
    assert bench_emberfl.prepare_data(TINY, data_dir) == data_dir  # reused, not rebuilt


def test_models_are_seeded() -> None:
    """The same seed gives the same model; the CNN has the tutorial's parameter count."""
    a = fl_workload.build_model("cnn", seed=1)
    b = fl_workload.build_model("cnn", seed=1)
    assert fl_workload.model_checksum(a) == fl_workload.model_checksum(b)
    assert sum(p.numel() for p in a.parameters()) == 62_006
    resnet = fl_workload.build_model("resnet18", seed=0)
    assert sum(p.numel() for p in resnet.parameters()) == 11_181_642


def test_emberfl_record(data_dir: Path) -> None:
    """A run's JSON has the config, versions, per-round times, breakdown and checksum."""
    serial = bench_emberfl.run_emberfl(TINY, data_dir, mode="serial", parallelism=1)
    thread = bench_emberfl.run_emberfl(TINY, data_dir, mode="thread", parallelism=2)
    for record in (serial, thread):
        json.dumps(record)  # JSON-ready
        assert record["framework"] == "emberfl"
        assert record["config"] == TINY.to_dict()
        assert len(record["round_seconds"]) == TINY.rounds
        assert record["total_seconds"] == pytest.approx(sum(record["round_seconds"]))
        assert len(record["checksum"]) == 64
        assert record["data_digest"]
        assert 0.0 <= record["summary"]["server_acc"] <= 1.0
        for row in record["breakdown"]:
            parts = row["dispatch_s"] + row["local_process_s"] + row["evaluation_s"]
            assert parts == pytest.approx(row["round_s"])
            # Uplinks are folded in while clients train: aggregation is part of the round.
            assert 0 < row["aggregation_s"] < row["local_process_s"]
            assert row["client_sum_s"] > 0
            assert row["clients"] == TINY.num_clients
    assert thread["parallelism"] == 2
    assert serial["checksum"] == thread["checksum"]  # emberfl: bitwise equal across modes
    assert "SUMMARY emberfl serial" in bench_emberfl.summary_line(serial)


def test_side_by_side_plan_and_summary() -> None:
    """Runs are interleaved, serial only at P=1, and ratios are peer time / emberfl time."""
    runs = side_by_side.plan(["emberfl", "blazefl", "flower"], ["serial", "process"], [1, 2], 1)
    names = [r.name for r in runs]
    assert names[:3] == ["emberfl-serial-P1-r0", "blazefl-serial-P1-r0", "emberfl-process-P1-r0"]
    assert "emberfl-serial-P2-r0" not in names
    assert names.count("flower-ray-P2-r0") == 1

    def rec(seconds: float, checksum: str = "c") -> dict[str, object]:
        return {"total_seconds": seconds, "checksum": checksum, "round_seconds": [seconds]}

    records = {
        "emberfl/process/P2": [rec(2.0)],
        "blazefl/process/P2": [rec(8.0, "d")],
        "flower/ray/P2": [rec(10.0, "e")],
    }
    summary = side_by_side.summarise(records)  # type: ignore[arg-type]
    assert summary["speedup"]["process/P2 vs blazefl"] == pytest.approx(4.0)
    assert summary["speedup"]["process/P2 vs flower"] == pytest.approx(5.0)
    assert "| blazefl | process | 2 |" in side_by_side.markdown(summary, records)  # type: ignore[arg-type]


def test_blazefl_pipeline_runs_on_emberfl_in_both_ipc_modes(data_dir: Path, tmp_path: Path) -> None:
    """The peer runner with ``--package emberfl`` (what ``bench_ipc_modes.py`` compares with
    BlazeFL 2.0.x): BlazeFL's contrib pipeline on emberfl, storage and shared-memory IPC."""
    import subprocess

    checksums = []
    for ipc_mode in ("storage", "shared_memory"):
        out = tmp_path / f"{ipc_mode}.json"
        subprocess.run(
            [
                sys.executable,
                str(BENCHES / "peers" / "blazefl_runner.py"),
                "--package",
                "emberfl",
                "--ipc-mode",
                ipc_mode,
                "--data-dir",
                str(data_dir),
                "--config-json",
                json.dumps(TINY.to_dict()),
                "--mode",
                "process",
                "--parallelism",
                "2",
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        record = json.loads(out.read_text())
        assert record["framework"] == "emberfl" and record["ipc_mode"] == ipc_mode
        assert len(record["round_seconds"]) == TINY.rounds
        checksums.append(record["checksum"])
    assert checksums[0] == checksums[1]


@pytest.mark.timeout(300)
def test_fault_soak_leaves_descriptors_flat_and_the_model_clean() -> None:
    """A short soak: one fault of each kind, then the same figures and a clean run's bits."""
    import bench_faults_soak

    args = bench_faults_soak.parse_args(["--rounds", "9", "--every", "2", "--clients", "4"])
    clean, _ = bench_faults_soak.soak(args, faults=False)
    faulted, samples = bench_faults_soak.soak(args, faults=True)
    assert [s["fault"] for s in samples if s["fault"]] == list(bench_faults_soak.FAULTS)
    assert all(s["error"] for s in samples if s["fault"])
    first = samples[0]
    for sample in samples[1:]:
        for key in ("fds", "memfds", "shm_entries", "children"):
            assert sample[key] == first[key], (sample, key)
    assert faulted == clean


def test_algorithm_bench_runs_and_records(tmp_path: Path) -> None:
    """One tiny configuration per algorithm kind: the record has the fields the summary reads."""
    import argparse

    import bench_algorithms

    args = argparse.Namespace(
        clients=6,
        sample_ratio=0.5,
        rounds=2,
        epochs=1,
        batch_size=16,
        lr=0.05,
        stragglers=0.5,
        dataset="digits",
    )
    for algorithm in ("fedavg", "scaffold", "qffl"):
        result = bench_algorithms.run_one(algorithm, 0, args, tmp_path, {})
        assert result["algorithm"] == algorithm
        assert 0.0 <= result["final_accuracy"] <= 1.0
        assert result["best_accuracy"] >= result["final_accuracy"]
        assert result["mean_round_s"] > 0
    args.dataset, args.synthetic, args.clients = "synthetic", "1,1", 4
    synthetic = bench_algorithms.run_one("fedprox", 0, args, tmp_path, {"prox_mu": 1.0})
    assert 0.0 <= synthetic["final_accuracy"] <= 1.0


def test_algorithm_cost_bench_times_every_kind(data_dir: Path) -> None:
    """The cost bench builds each algorithm with its defaults and times the rounds after
    the warm-up, in a per-client and the vectorized mode."""
    import argparse

    import bench_algorithm_cost

    dataset = fl_workload.InMemoryPartitionedDataset(fl_workload.load_workload_data(data_dir))
    args = argparse.Namespace(preset="tiny", rounds=3)
    for name, mode in [("fedavg", "serial"), ("ifca", "serial"), ("scaffold", "vectorized")]:
        times = bench_algorithm_cost.time_rounds(name, mode, dataset, args)
        assert len(times) == 2 and all(t > 0 for t in times), (name, mode)


def test_robust_bench_runs_attacked_and_clean_and_times_every_rule(tmp_path: Path) -> None:
    """The robust bench's run and cost paths produce the fields its summary reads."""
    import argparse

    import bench_robust

    args = argparse.Namespace(
        clients=11, rounds=2, epochs=1, batch_size=16, lr=0.05, attack="sign-flip",
        malicious_fraction=0.15, trim_ratio=0.2, clip_norm=1.0,
    )  # fmt: skip
    for rule in ("clean", "mean", "bulyan"):
        result = bench_robust.run_one(rule, 0, args, tmp_path)
        assert result["aggregator"] == rule and 0.0 <= result["final_accuracy"] <= 1.0
    rules = ["mean", "median", "krum", "bulyan", "geometric-median", "clipped-mean"]
    seconds = bench_robust.aggregation_cost(12, 1000, 1, rules)
    assert set(seconds) == set(rules) and all(v >= 0 for v in seconds.values())


def test_privacy_bench_records_accuracy_and_epsilon(tmp_path: Path) -> None:
    """The privacy bench's runs carry the epsilon the summary reports."""
    import argparse

    import bench_privacy

    from emberfl.privacy import epsilon

    args = argparse.Namespace(
        clients=20, sample_ratio=0.3, rounds=2, epochs=1, batch_size=16, lr=0.1,
        clip_norm=1.0, delta=1e-3, dp="central",
    )  # fmt: skip
    plain = bench_privacy.run_one("none", 0, args, tmp_path)
    assert plain["epsilon"] is None and 0 <= plain["final_accuracy"] <= 1
    private = bench_privacy.run_one("1.5", 0, args, tmp_path)
    assert private["epsilon"] == epsilon(1.5, 0.3, 2, 1e-3)
    args.dp, args.clients, args.sample_ratio = "local", 4, 1.0
    local = bench_privacy.run_one("1.5", 1, args, tmp_path)
    assert local["epsilon"] is not None and local["epsilon"] > 0


def test_async_bench_times_fedavg_by_its_slowest_client_and_summarises(tmp_path: Path) -> None:
    """FedAvg's virtual rounds last as long as their slowest sampled client; a FedBuff run
    is judged within that budget."""
    import argparse

    import bench_async
    from bench_common import run_rows

    from emberfl.asynchronous import ClientClock
    from emberfl.simulation import sample_clients

    args = argparse.Namespace(
        clients=8, concurrency=4, buffer_size=2, rounds=3, epochs=1, batch_size=16, lr=0.1,
        mu=0.0, sigma=1.0, target=0.5,
    )  # fmt: skip
    clock = ClientClock(sigma=1.0)
    times = bench_async._fedavg_times(0, args)
    slowest = [max(clock.duration(0, c) for c in sample_clients(0, r, 8, 4)) for r in range(3)]
    assert times == [sum(slowest[: i + 1]) for i in range(3)]
    rows = run_rows(bench_async._config("fedbuff", 0, 6, args, tmp_path))
    virtual = [float(r["virtual_time_s"]) for r in rows]
    result = bench_async._summarise("fedbuff", 0, virtual, rows, args)
    assert result["budget_s"] == times[-1]
    assert result["updates_in_budget"] == sum(t <= times[-1] for t in virtual)


def test_compression_bench_parses_settings_and_counts_bytes(tmp_path: Path) -> None:
    """The compression bench's settings reach the run, and its bytes are the run's."""
    import argparse

    import bench_compression

    assert bench_compression.options("topk:0.05-noef") == {
        "compression": "topk", "error_feedback": False, "compression_ratio": 0.05,
    }  # fmt: skip
    args = argparse.Namespace(
        clients=6, sample_ratio=0.5, alpha=0.5, rounds=2, epochs=1, batch_size=16, lr=0.05
    )
    dense = bench_compression.run_one("none", 0, args, tmp_path)
    sparse = bench_compression.run_one("topk:0.01", 0, args, tmp_path)
    assert 0 < sparse["uplink_bytes"] < dense["uplink_bytes"] == dense["downlink_bytes"]


def test_cost_bench_measures_the_compression_share(data_dir: Path) -> None:
    """A compressed algorithm's rounds report the share the wrapper adds."""
    import argparse

    import bench_algorithm_cost

    dataset = fl_workload.InMemoryPartitionedDataset(fl_workload.load_workload_data(data_dir))
    args = argparse.Namespace(preset="tiny", rounds=3)
    times = bench_algorithm_cost.time_rounds("fedavg+qsgd:4", "serial", dataset, args)
    assert len(times) == 2
    assert 0 < bench_algorithm_cost.LAST_SHARE.pop("fedavg+qsgd:4") < 1


def test_leaf_bench_loads_what_it_wrote_from_the_cache(tmp_path: Path) -> None:
    """The LEAF bench's FEMNIST fixture converts, and a second load maps the same data."""
    import bench_leaf

    from emberfl.data.leaf import load_leaf

    images = bench_leaf.write_femnist(tmp_path, users=5, samples=3, per_file=2)
    assert images == 15 and len(list((tmp_path / "femnist" / "train").glob("*.json"))) == 3
    first = bench_leaf.probe(str(tmp_path), trace=True)
    cached = bench_leaf.probe(str(tmp_path), trace=False)
    assert first["checksum"] == cached["checksum"]
    assert first["heap_peak"] > 0 and cached["seconds"] >= 0
    assert load_leaf("femnist", tmp_path).num_train == images
