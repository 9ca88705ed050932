"""`emberfl run --algorithm fedasync|fedbuff`: asynchronous FL from the command line.

A row of metrics is one server update, with the virtual clock and the reports' staleness;
``staleness.csv`` counts every report; FedBuff with equal speeds and K = concurrency = m
gives FedAvg's model; a run stopped (or SIGKILLed) between updates and resumed, in any
mode, ends with an uninterrupted run's bytes; `emberfl report` and `emberfl plot` show the
staleness; options that do not apply are one-line usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emberfl.cli import main
from emberfl.cli.checkpoint import load_checkpoint
from emberfl.cli.report import format_report
from fl_testkit import sigkill_after_checkpoint

TINY = [
    "--num-clients", "8", "--epochs", "1", "--batch-size", "16", "--train-size", "300",
    "--quiet",
]  # fmt: skip


def run(*args: str) -> int:
    return main(["run", *args])


def rows_of(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def staleness_of(run_dir: Path) -> dict[int, int]:
    lines = (run_dir / "staleness.csv").read_text().split()
    assert lines[0] == "staleness,reports"
    return {int(s): int(n) for s, n in (line.split(",") for line in lines[1:])}


@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_each_row_is_a_server_update_on_the_virtual_clock(tmp_path: Path, name: str) -> None:
    run_dir = tmp_path / "run"
    argv = ["--algorithm", name, "--rounds", "6", "--concurrency", "4", "--output-dir"]
    assert run(*argv, str(run_dir), *TINY) == 0
    rows = rows_of(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 7))
    times = [float(r["virtual_time_s"]) for r in rows]  # type: ignore[arg-type]
    assert times == sorted(times) and times[0] > 0
    reports = [int(r["num_clients"]) for r in rows]  # type: ignore[call-overload]
    assert reports == [1 if name == "fedasync" else 4] * 6  # FedBuff's K = min(10, 4)
    # Every report is counted once, with the staleness its row summarised.
    counts = staleness_of(run_dir)
    assert sum(counts.values()) == sum(reports)
    assert max(counts) == max(int(r["max_staleness"]) for r in rows)  # type: ignore[call-overload]
    assert max(counts) > 0  # lognormal:0,1 speeds make some reports stale
    dim = sum(t.numel() for t in load_file(run_dir / "final_model.safetensors").values())
    assert all(r["uplink_bytes"] == n * 4 * dim for r, n in zip(rows, reports, strict=True))


def test_fedbuff_with_equal_speeds_is_fedavg(tmp_path: Path) -> None:
    common = ["--rounds", "3", "--sample-ratio", "0.5", *TINY]
    assert run("--algorithm", "fedavg", "--output-dir", str(tmp_path / "sync"), *common) == 0
    fedbuff = ["--algorithm", "fedbuff", "--client-speed", "lognormal:0,0", "--buffer-size", "4"]
    assert run(*fedbuff, "--output-dir", str(tmp_path / "buff"), *common) == 0
    sync = load_file(tmp_path / "sync" / "final_model.safetensors")
    buff = load_file(tmp_path / "buff" / "final_model.safetensors")
    for key, value in sync.items():
        assert torch.allclose(buff[key], value, rtol=0, atol=1e-6 * float(value.abs().max())), key
    assert staleness_of(tmp_path / "buff") == {0: 12}
    assert [r["virtual_time_s"] for r in rows_of(tmp_path / "buff")] == [1.0, 2.0, 3.0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_resume_in_another_mode_gives_an_uninterrupted_runs_bytes(
    tmp_path: Path, name: str
) -> None:
    options = ["--algorithm", name, "--checkpoint-every", "1", "--concurrency", "5", *TINY]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run("--rounds", "7", "--output-dir", str(whole), *options) == 0
    assert run("--rounds", "3", "--output-dir", str(part), *options) == 0
    checkpoint = load_checkpoint(part)
    assert checkpoint is not None and checkpoint.round == 3
    assert checkpoint.tensors["async/flight"].shape[0] > 0  # clients were in flight
    argv = ["--resume", str(part), "--rounds", "7", "--mode", "process", "--parallelism", "2"]
    assert run(*argv, "--quiet") == 0
    assert (part / "final_model.safetensors").read_bytes() == (
        whole / "final_model.safetensors"
    ).read_bytes()
    strip = ("wall_time_s", "round_time_s")
    same = [{k: v for k, v in r.items() if k not in strip} for r in rows_of(whole)]
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows_of(part)] == same
    assert staleness_of(part) == staleness_of(whole)


@pytest.mark.timeout(300)
def test_sigkill_then_resume_gives_an_uninterrupted_runs_bytes(tmp_path: Path) -> None:
    options = [
        "--algorithm", "fedbuff", "--rounds", "40", "--checkpoint-every", "1",
        "--buffer-size", "2", "--concurrency", "4", *TINY,
    ]  # fmt: skip
    whole = tmp_path / "whole"
    assert run("--output-dir", str(whole), *options) == 0
    run_dir = tmp_path / "killed"
    stopped = sigkill_after_checkpoint(
        [*options, "--mode", "thread", "--parallelism", "2"], run_dir
    )
    assert 2 <= stopped < 40
    assert run("--resume", str(run_dir), "--quiet") == 0
    final = (run_dir / "final_model.safetensors").read_bytes()
    assert final == (whole / "final_model.safetensors").read_bytes()
    assert staleness_of(run_dir) == staleness_of(whole)


def test_report_and_plot_show_the_staleness(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run("--algorithm", "fedasync", "--rounds", "8", "--output-dir", str(run_dir), *TINY) == 0
    report = format_report(run_dir)
    counts = staleness_of(run_dir)
    assert "staleness (reports per server updates since the client started)" in report
    assert f"{sum(counts.values())} reports, mean staleness" in report
    assert "server updates in" in report  # the summary's asynchronous line
    assert main(["plot", str(run_dir)]) == 0
    for png in ("accuracy_time.png", "staleness.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run_dir / "staleness.csv").write_text("not a table\n")
    assert "staleness.csv is unreadable" in format_report(run_dir)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "fedasync", "--buffer-size", "3"], "it is an option of fedbuff"),
        (["--algorithm", "fedavg", "--concurrency", "3"], "it is an option of fedasync, fedbuff"),
        (["--algorithm", "fedbuff", "--staleness", "hinge"], "it is an option of fedasync"),
        (["--algorithm", "fedbuff", "--concurrency", "9"], "concurrency must be in 1..8"),
        (["--algorithm", "fedbuff", "--concurrency", "0"], "concurrency must be in 1..8"),
        (["--algorithm", "fedbuff", "--buffer-size", "0"], "buffer_size must be at least 1"),
        (["--algorithm", "fedbuff", "--client-speed", "normal:0,1"], "lognormal:MU,SIGMA"),
        (["--algorithm", "fedbuff", "--client-speed", "lognormal:0,-1"], "SIGMA >= 0"),
        (["--algorithm", "fedasync", "--fedasync-alpha", "1.5"], "fedasync_alpha must be in"),
        (["--algorithm", "fedasync", "--staleness-b", "2"], "option of staleness 'hinge'"),
        (
            ["--algorithm", "fedasync", "--staleness", "constant", "--staleness-a", "1"],
            "option of staleness 'polynomial' or 'hinge'",
        ),
        (["--algorithm", "fedbuff", "--aggregator", "median"], "is asynchronous"),
        (["--algorithm", "fedasync", "--dp", "central"], "is asynchronous"),
        (["--algorithm", "fedbuff", "--compression", "topk"], "is asynchronous"),
        (
            ["--algorithm", "fedbuff", "--stragglers", "0.5", "--drop-stragglers"],
            "drop_stragglers does not apply",
        ),
    ],
)
def test_bad_asynchronous_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(*argv, "--output-dir", str(tmp_path / "run"), *TINY) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_options_reach_the_server_rule_and_the_clock() -> None:
    from emberfl.asynchronous import FedAsync, FedBuff
    from emberfl.cli.config import RunConfig, build_async

    config = RunConfig(
        algorithm="fedasync", fedasync_alpha=0.3, staleness="hinge", staleness_a=2.0,
        staleness_b=3.0, concurrency=4, client_speed="lognormal:0.5,1.5",
    )  # fmt: skip
    config.validate()
    server, clock, concurrency = build_async(config)
    assert server == FedAsync(alpha=0.3, staleness="hinge", a=2.0, b=3.0)
    assert (clock.mu, clock.sigma, concurrency) == (0.5, 1.5, 4)
    defaults = RunConfig(algorithm="fedasync", staleness="hinge")
    assert build_async(defaults)[0] == FedAsync(alpha=0.6, staleness="hinge", a=10.0, b=4.0)
    buff = RunConfig(algorithm="fedbuff", num_clients=40, sample_ratio=0.5, server_lr=0.5)
    server, clock, concurrency = build_async(buff)
    assert server == FedBuff(buffer_size=10, server_lr=0.5) and concurrency == 20
    assert (clock.mu, clock.sigma) == (0.0, 1.0)
