"""``emberfl run --logger``: what TensorBoard, MLflow and W&B hold, read back with each
library's own reader (TensorBoard's event accumulator, MLflow's client on the local store,
W&B's protobuf records in its offline run file), equals ``metrics.jsonl`` and the config;
a resumed run continues the same tracker runs; a missing extra or a failing tracker."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from emberfl.cli import main
from emberfl.cli.trackers import Trackers
from fl_testkit import sigkill_after_checkpoint

ARGV = ["--rounds", "4", "--num-clients", "4", "--epochs", "1", "--quiet"]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps: dict[int, float] = {}
    for event in acc.Scalars(tag):
        assert event.step not in steps, f"step {event.step} logged twice"
        steps[event.step] = event.value
    return steps


def _mlflow(run: Path) -> tuple[dict[str, str], dict[str, list[tuple[int, float]]]]:
    import mlflow

    ids = json.loads((run / "trackers.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    info = client.get_run(ids["mlflow"])
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
        for key in ("test_accuracy", "train_loss")
    }
    return dict(info.data.params), history


def _wandb_records(run: Path) -> list[Any]:
    """Every record of the W&B offline run files, parsed with W&B's own protobuf schema.

    The ``.wandb`` file is a 7-byte ``:W&B`` header, then records in LevelDB's log format:
    32 KiB blocks of chunks ``crc32c (4) | length (2, little-endian) | type (1) | data``,
    type 1 a whole record, 2/3/4 its first, middle and last pieces.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length = int.from_bytes(data[pos + 4 : pos + 6], "little")
            kind = data[pos + 6]
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 1:
                pieces = [chunk]
            elif kind == 2:
                pending, pieces = chunk, []
            elif kind == 3:
                pending, pieces = pending + chunk, []
            elif kind == 4:
                pieces = [pending + chunk]
            else:
                continue
            for piece in pieces:
                record = pb.Record()
                record.ParseFromString(piece)
                records.append(record)
    return records


def _wandb(run: Path) -> tuple[dict[str, Any], dict[int, float]]:
    config: dict[str, Any] = {}
    steps: dict[int, float] = {}
    for record in _wandb_records(run):
        kind = record.WhichOneof("record_type")
        updates = {"run": lambda r: r.run.config.update, "config": lambda r: r.config.update}
        if kind in updates:
            for item in updates[kind](record):
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            # Newer W&B versions spell keys as nested_key; older ones as key.
            row = {
                item.key or ".".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if "test_accuracy" in row:
                steps[int(record.history.step.num)] = float(row["test_accuracy"])
    return config, steps


def test_every_tracker_holds_the_config_and_every_round(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["run", *ARGV, "--logger", "tensorboard,wandb,mlflow",
                 "--output-dir", str(run)]) == 0  # fmt: skip
    rows = _metrics(run)
    want = {r["round"]: r["test_accuracy"] for r in rows}
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["logger"] == ["tensorboard", "wandb", "mlflow"]

    tb = _tensorboard(run, "test_accuracy")
    assert tb.keys() == want.keys()
    for step, value in want.items():
        assert tb[step] == pytest.approx(value, rel=1e-6)  # stored as float32
    assert tb_losses(run) == pytest.approx({r["round"]: r["train_loss"] for r in rows}, rel=1e-6)

    params, history = _mlflow(run)
    assert params["algorithm"] == "fedavg" and params["num_clients"] == "4"
    assert params["lr"] == str(config["lr"])
    assert history["test_accuracy"] == [(r["round"], r["test_accuracy"]) for r in rows]
    assert history["train_loss"] == [(r["round"], r["train_loss"]) for r in rows]

    wb_config, wb_steps = _wandb(run)
    assert wb_config["algorithm"] == "fedavg" and wb_config["lr"] == config["lr"]
    assert wb_steps == want


def tb_losses(run: Path) -> dict[int, float]:
    return _tensorboard(run, "train_loss")


def test_a_resumed_run_continues_its_tracker_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = [*ARGV, "--rounds", "5", "--checkpoint-every", "1", "--logger", "tensorboard,mlflow"]
    stopped = sigkill_after_checkpoint(argv, run, min_round=2)
    ids = json.loads((run / "trackers.json").read_text())
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same MLflow run
    rows = _metrics(run)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    want = {r["round"]: r["test_accuracy"] for r in rows}
    # TensorBoard dropped what the killed attempt logged past its checkpoint: one event
    # per step (asserted by _tensorboard), equal to the final metrics.
    assert _tensorboard(run, "test_accuracy") == pytest.approx(want, rel=1e-6)
    _, history = _mlflow(run)
    # MLflow keeps every value logged: a step logged just before the kill may appear again
    # after the resume, with the same value (the run is deterministic).
    assert dict(history["test_accuracy"]) == want
    assert [s for s, _ in history["test_accuracy"]][:stopped] == list(range(1, stopped + 1))


def test_a_missing_extra_is_one_line_naming_the_pip_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def no_wandb(name: str, *args: Any) -> Any:
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_wandb)
    run = tmp_path / "run"
    assert main(["run", *ARGV, "--logger", "wandb", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'emberfl: error: --logger wandb needs the wandb package: pip install "emberfl[wandb]"'
    )
    assert not run.exists()
    assert main(["run", *ARGV, "--logger", "neptune", "--output-dir", str(run)]) == 2
    assert "choose trackers from tensorboard, wandb, mlflow" in capsys.readouterr().err


class _Broken:
    def __init__(self) -> None:
        self.calls = 0

    def log(self, row: Any, step: int) -> None:
        self.calls += 1
        raise RuntimeError("server went away")

    def close(self) -> None:
        pass


class _Fine:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def log(self, row: Any, step: int) -> None:
        self.steps.append(step)

    def close(self) -> None:
        pass


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken, fine = _Broken(), _Fine()
    trackers = Trackers([("wandb", broken), ("tensorboard", fine)])
    for r in (1, 2, 3):
        trackers.log({"round": r, "test_accuracy": 0.5})
    trackers.close()
    assert broken.calls == 1 and fine.steps == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("--logger wandb failed") == 1 and "server went away" in err
