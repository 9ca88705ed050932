"""The `emberfl` command line: run, plot, report, config files and error handling.

CLI runs are in-process (`main([...])`) on tiny digits configurations; only the
`python -m emberfl --help` smoke test starts a subprocess (the kill/resume test lives in
test_checkpoint.py).
"""

from __future__ import annotations

import csv
import doctest
import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emberfl.cli import main
from emberfl.cli.config import RunConfig, merge_config, partition_options
from emberfl.cli.metrics import METRIC_FIELDS, OPTIONAL_FIELDS, format_summary
from emberfl.errors import ConfigError
from emberfl.models import Models

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-clients", "3", "--rounds", "2", "--epochs", "1", "--batch-size", "16"]


def run_cli(*args: str) -> int:
    return main(["run", *args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One finished tiny run, shared by the tests that only read its results."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli("--output-dir", str(run_dir), *TINY, "--checkpoint-every", "1") == 0
    return run_dir, out.getvalue()


# --------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------


def test_python_dash_m_help_smoke() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "emberfl", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("run", "plot", "report"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["run", "plot", "report"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: emberfl {command}" in capsys.readouterr().out


def test_run_help_lists_options_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--output-dir", "--algorithm", "--model", "--dataset", "--data-root", "--partition",
        "--alpha", "--shards-per-client", "--classes-per-client", "--min-size", "--sigma",
        "--num-clients", "--rounds", "--sample-ratio", "--epochs", "--batch-size", "--lr",
        "--mode", "--parallelism", "--device", "--seed", "--checkpoint-every", "--resume",
        "--quiet", "--config",
    ):  # fmt: skip
        assert flag in text, flag
    assert "(default: 20)" in text  # rounds
    assert "serial, thread, process" in text


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "emberfl: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# A tiny run and what it writes
# --------------------------------------------------------------------------------------


def test_run_writes_results(tiny_run: tuple[Path, str]) -> None:
    run_dir, stdout = tiny_run
    for name in (
        "config.toml",
        "metrics.jsonl",
        "metrics.csv",
        "partition.csv",
        "partition.png",
        "final_model.safetensors",
        "checkpoint/state.json",
    ):
        assert (run_dir / name).is_file(), name
    assert f"results in {run_dir}" in stdout
    assert "final test accuracy" in stdout
    assert "test acc" in stdout  # the summary table's header


def test_metrics_files(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) == set(METRIC_FIELDS) - OPTIONAL_FIELDS
        assert row["num_clients"] == 3
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["train_loss"] > 0 and row["test_loss"] > 0
    assert rows[1]["wall_time_s"] >= rows[0]["wall_time_s"] > 0
    with (run_dir / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in table] == [r["test_accuracy"] for r in rows]
    assert tuple(table[0]) == METRIC_FIELDS


def test_effective_config_is_written_and_reusable(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["num_clients"] == 3
    assert saved["rounds"] == 2
    assert saved["partition"] == "dirichlet"
    # Partition defaults are resolved into the effective config.
    assert saved["alpha"] == 0.5
    assert saved["min_size"] == 10
    assert "output_dir" not in saved
    assert merge_config(RunConfig(), saved).num_clients == 3


def test_final_model_loads_into_the_model(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    state = load_file(str(run_dir / "final_model.safetensors"))
    model = Models(input_shape=(1, 8, 8), num_classes=10).select_model("mlp")
    model.load_state_dict(state)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_config_file_with_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(
        '# experiment\nnum-clients = 4\nrounds = 3\nlr = 1\nepochs = 1\npartition = "shards"\n'
        "shards_per_client = 3\n"
    )
    run_dir = tmp_path / "run"
    assert run_cli("--config", str(config), "--rounds", "1", "--output-dir", str(run_dir)) == 0
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert (saved["num_clients"], saved["rounds"], saved["lr"]) == (4, 1, 1.0)
    assert (saved["partition"], saved["shards_per_client"]) == ("shards", 3)
    assert "alpha" not in saved
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_quiet_run_prints_only_the_run_dir_and_leaves_global_rng_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "q"
    before = torch.get_rng_state()
    assert run_cli("--output-dir", str(run_dir), *TINY, "--rounds", "1", "--quiet") == 0
    assert torch.equal(torch.get_rng_state(), before)
    captured = capsys.readouterr()
    assert captured.out == f"{run_dir}\n"
    assert captured.err == ""


def test_default_output_dir_is_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(*TINY, "--rounds", "1", "--quiet") == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.parent == Path("runs")
    assert printed.name.startswith("digits-fedavg-")
    assert (tmp_path / printed / "final_model.safetensors").is_file()


def test_execution_modes_give_bitwise_identical_models(tmp_path: Path) -> None:
    """Also proves the CLI's data set and model selector work in worker processes."""
    finals = []
    for mode, workers in (("serial", "0"), ("thread", "2"), ("process", "1")):
        run_dir = tmp_path / mode
        argv = ["--output-dir", str(run_dir), *TINY, "--mode", mode, "--parallelism", workers]
        assert run_cli(*argv, "--quiet") == 0
        finals.append((run_dir / "final_model.safetensors").read_bytes())
    assert finals[0] == finals[1] == finals[2]


@pytest.mark.slow
def test_default_run_reaches_90_percent(tmp_path: Path) -> None:
    """The no-options run (FedAvg, digits, 10 non-IID clients) reaches >= 90% test accuracy."""
    run_dir = tmp_path / "default"
    assert run_cli("--output-dir", str(run_dir), "--quiet") == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == RunConfig().rounds
    assert rows[-1]["test_accuracy"] >= 0.90


# --------------------------------------------------------------------------------------
# plot and report
# --------------------------------------------------------------------------------------


def test_plot_writes_pngs(
    tiny_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = tiny_run
    out = tmp_path / "figs"
    assert main(["plot", str(run_dir), "--out-dir", str(out)]) == 0
    for name in ("accuracy.png", "loss.png", "partition.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert capsys.readouterr().out.split() == [
        str(out / name) for name in ("accuracy.png", "loss.png", "partition.png")
    ]


def test_report_prints_config_summary_and_partition(
    tiny_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = tiny_run
    assert main(["report", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "status: complete (2 rounds)" in text
    assert 'partition = "dirichlet"' in text
    assert "final test accuracy" in text
    assert "label skew (mean TV distance" in text
    assert "clients" in text
    # One line per client: its size and largest classes, from partition.csv.
    import csv

    with (run_dir / "partition.csv").open() as f:
        first = next(csv.DictReader(f))
    counts = {k: int(v) for k, v in first.items() if k.startswith("class_")}
    biggest = max(counts, key=lambda k: (counts[k], -int(k[6:])))
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("0 "))
    assert line.split()[1] == first["total"]
    assert line.split()[2] == f"{biggest[6:]}:{counts[biggest]}"


@pytest.mark.parametrize("command", ["plot", "report"])
def test_plot_and_report_need_a_run_dir(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not an emberfl run directory" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# Bad input: one line on stderr, status 2 for usage errors, 1 otherwise, nothing created
# --------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--mode", "fast"], 2, "invalid choice: 'fast'"),
    (["--model", "vgg"], 2, "invalid choice: 'vgg'"),
    (["--rounds", "ten"], 2, "invalid int value"),
    (["--no-such-option"], 2, "unrecognized arguments"),
    (["--alpha", "0"], 2, "alpha must be a positive number"),
    (["--alpha", "-1"], 2, "alpha must be a positive number"),
    (["--partition", "shards", "--shards-per-client", "1000"], 2, "shards"),
    (["--partition", "label-quantity", "--classes-per-client", "11"], 2, "classes_per_client"),
    (["--partition", "iid", "--alpha", "0.3"], 2, "does not use alpha"),
    (["--num-clients", "5000"], 2, "cannot split 1437 samples among 5000 clients"),
    (["--num-clients", "20", "--min-size", "100"], 2, "lower min_size"),
    (["--num-clients", "0"], 2, "num_clients must be at least 1"),
    (["--sample-ratio", "1.5"], 2, "sample_ratio must be in (0, 1]"),
    (["--lr", "nan"], 2, "lr must be a positive number"),
    (["--device", "tpu"], 2, "unknown device 'tpu'"),
    (["--model", "cnn"], 2, "at least 16x16"),
    (["--dataset", "cifar10"], 2, "--data-root"),
    (["--dataset", "mnist", "--data-root", "{tmp}/missing"], 2, "is not a folder"),
    (["--dataset", "mnist", "--data-root", "{tmp}"], 1, "not found under"),
    (["--train-size", "4Q"], 2, "is not a count"),
    (["--train-size", "0"], 2, "not a positive whole count"),
    (["--train-size", "5000"], 2, "larger than digits's 1437 training samples"),
    (["--hidden-sizes", "20,x"], 2, "comma-separated list of widths"),
    (["--hidden-sizes", "0"], 2, "every width must be >= 1"),
    (["--model", "small-cnn", "--hidden-sizes", "64"], 2, "does not use it"),
]


@pytest.mark.parametrize(("argv", "status", "fragment"), BAD_OPTIONS)
def test_bad_options(
    argv: list[str],
    status: int,
    fragment: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli("--output-dir", str(out), *args) == status
    err = capsys.readouterr().err
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("rounds = ", "not valid TOML"),
        ("round = 3", "unknown key 'round' (did you mean 'rounds'?)"),
        ('rounds = "ten"', "rounds must be an integer, got 'ten'"),
        ("quiet = 1", "quiet must be true or false"),
        ("lr = [0.1, 0.2]", "must be a single value, not an array"),
        ("[fedavg]\nlr = 0.1", "unknown key 'fedavg'"),
        ('mode = "gpu"', "unknown mode 'gpu'"),
    ],
)
def test_bad_config_files(
    content: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content + "\n")
    assert run_cli("--config", str(config)) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--config", str(tmp_path / "nope.toml")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli("--output-dir", str(blocker / "run"), *TINY) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err
    assert "--output-dir" in err


def test_output_dir_holding_a_run_is_refused(
    tiny_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = tiny_run
    before = (run_dir / "final_model.safetensors").read_bytes()
    assert run_cli("--output-dir", str(run_dir), *TINY) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run_dir / "final_model.safetensors").read_bytes() == before


def test_real_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import emberfl.cli.run as run_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_module, "run_experiment", broken)
    with pytest.raises(ZeroDivisionError):
        run_cli(*TINY)


# --------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------


def test_partition_defaults_fit_the_data() -> None:
    config = merge_config(RunConfig(), {"num_clients": 100})
    assert partition_options(config, 1437) == {"alpha": 0.5, "min_size": 3}
    assert partition_options(RunConfig(), 50_000) == {"alpha": 0.5, "min_size": 10}
    # 10 samples per client on average (the memory benchmark's 4,000 over 400 clients).
    crowded = merge_config(RunConfig(), {"num_clients": 400})
    assert partition_options(crowded, 4000) == {"alpha": 0.5, "min_size": 2}
    shards = merge_config(RunConfig(), {"partition": "shards"})
    assert partition_options(shards, 1437) == {"shards_per_client": 2}


def test_merge_config_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="did you mean 'num_clients'"):
        merge_config(RunConfig(), {"num_client": 3})


def test_summary_table_thins_long_runs() -> None:
    rows = [
        {"round": r, "num_clients": 2, "test_accuracy": r / 100, "wall_time_s": float(r)}
        for r in range(1, 51)
    ]
    table = format_summary(rows, max_rows=5)
    body = table.splitlines()[2:-1]
    assert len(body) == 5
    assert body[0].split()[0] == "1"
    assert body[-1].split()[0] == "50"
    assert "best 50.00% at round 50" in table
    assert format_summary([]) == "no round completed yet"


@pytest.mark.parametrize("module", ["emberfl.cli", "emberfl.cli.config"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_train_size_and_hidden_sizes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *TINY, "--train-size", "0.3K", "--hidden-sizes", "24,12"]
    assert run_cli(*argv, "--quiet") == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["train_size"] == 300 and saved["hidden_sizes"] == [24, 12]
    counts = (out / "partition.csv").read_text().splitlines()[1:]
    assert sum(int(x) for row in counts for x in row.split(",")[1:-1]) == 300
    state = load_file(str(out / "final_model.safetensors"))
    assert [tuple(t.shape) for k, t in state.items() if k.endswith("weight")] == [
        (24, 64),
        (12, 24),
        (10, 12),
    ]
    again = tmp_path / "again"  # the same seed draws the same 300 samples
    assert run_cli(*[a if a != str(out) else str(again) for a in argv], "--quiet") == 0
    assert (again / "partition.csv").read_text() == (out / "partition.csv").read_text()
    config = tmp_path / "c.toml"
    config.write_text("hidden_sizes = [7]\ntrain_size = 200\n")
    third = tmp_path / "third"
    assert main(["run", "--config", str(config), "--output-dir", str(third), *TINY, "-q"]) == 0
    assert load_file(str(third / "final_model.safetensors"))["layers.1.weight"].shape == (7, 64)


def test_run_help_lists_every_algorithm_with_its_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from emberfl.algorithms import ALGORITHMS

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "algorithms (--algorithm):" in out
    for name, cls in ALGORITHMS.items():
        assert any(line.split() == [name, *cls.summary.split()] for line in out.splitlines())


def test_summary_table_shows_the_clients_own_tests_when_the_run_has_them() -> None:
    rows = [
        {"round": r, "num_clients": 2, "test_accuracy": 0.5, "wall_time_s": float(r),
         "client_test_accuracy": 0.6, "personal_test_accuracy": 0.9 + r / 100}
        for r in (1, 2)
    ]  # fmt: skip
    table = format_summary(rows)
    header = table.splitlines()[0]
    assert "own-test acc" in header and "personal acc" in header
    assert "92.00%" in table.splitlines()[3]  # round 2's personal accuracy, in its row
    assert "personal models on their own tests: 92.00%" in table
    plain = format_summary([{k: v for k, v in r.items() if "_test_" not in k} for r in rows])
    assert "own-test" not in plain and "personal" not in plain
