"""Experiment trackers for ``emberfl run --logger``: TensorBoard, Weights & Biases, MLflow.

Each logs the run's configuration once and every row of ``metrics.jsonl`` (its numeric
values, at step = the round), and is offline by default:

* ``tensorboard`` (``pip install "emberfl[tensorboard]"``): event files in
  ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``); the
  configuration as the text ``config``.
* ``wandb`` (``pip install "emberfl[wandb]"``): an offline run under ``RUN_DIR/wandb/``
  (``wandb sync`` uploads it) unless ``WANDB_MODE`` says otherwise; project
  ``WANDB_PROJECT`` or ``emberfl``.
* ``mlflow`` (``pip install "emberfl[mlflow]"``): a local file store in
  ``RUN_DIR/mlruns/`` (``mlflow ui --backend-store-uri RUN_DIR/mlruns``) unless
  ``MLFLOW_TRACKING_URI`` names another; experiment ``MLFLOW_EXPERIMENT_NAME`` or
  ``emberfl``; the configuration as parameters.

A resumed run continues the same tracker run (its ids are kept in ``RUN_DIR/trackers.json``)
and logs the rows after the checkpoint: TensorBoard drops the events an interrupted
attempt had logged past the checkpoint; MLflow keeps every value it was sent, so a round
logged just before a kill appears twice, with the same value (runs are deterministic);
W&B continues its offline run under the same id. A tracker that
fails while the run goes on is reported once on stderr and switched off; the run and its
files are not affected.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from emberfl.atomic import atomic_write_text
from emberfl.errors import ConfigError

__all__ = ["LOGGERS", "TRACKERS_FILE", "Tracker", "Trackers", "open_trackers", "require_trackers"]

LOGGERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
"""The trackers ``--logger`` takes."""
TRACKERS_FILE = "trackers.json"
"""The trackers' run ids, so that a resumed run continues them."""


class Tracker(Protocol):
    """What ``emberfl run`` needs of a tracker."""

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Log one metrics row at ``step``."""

    def close(self) -> None:
        """Flush and close."""


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "round"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


def _missing(name: str) -> ConfigError:
    return ConfigError(f'--logger {name} needs the {name} package: pip install "emberfl[{name}]"')


def require_trackers(names: Sequence[str]) -> None:
    """Check that every named tracker's package is installed (before a run starts).

    Raises:
        ConfigError: Naming the pip command of the first one missing.
    """
    import importlib.util

    for name in names:
        # Each tracker's extra and package share its name.
        if name in LOGGERS and importlib.util.find_spec(name) is None:
            raise _missing(name)


class _TensorBoard:
    def __init__(self, run_dir: Path, config_text: str, start_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        # purge_step: a resumed run drops what an earlier attempt logged past the checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"),
            purge_step=start_round + 1 if start_round else None,
        )
        if start_round == 0:
            self.writer.add_text("config", "```\n" + config_text + "\n```", global_step=0)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], ids: dict[str, str]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        run_id = ids.setdefault("wandb", uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "emberfl"),
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=dict(config),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log(_numbers(row), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], ids: dict[str, str]) -> None:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local file store beside the run (MLflow asks for this opt-in since 3.x).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if "mlflow" in ids:
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "emberfl")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(name)
            )
            run = self.client.create_run(experiment_id, run_name=run_dir.name)
            self.run_id = ids["mlflow"] = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            self.client.log_batch(self.run_id, params=params)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * float(row.get("wall_time_s", 0.0)))
        metrics = [Metric(k, v, stamp, step) for k, v in _numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers of one run: each row goes to all of them; a failing one is switched off.

    Attributes:
        active: ``(name, tracker)`` pairs still logging.
    """

    def __init__(self, active: list[tuple[str, Tracker]]) -> None:
        """Wrap opened trackers."""
        self.active = active

    def log(self, row: Mapping[str, Any]) -> None:
        """Log one metrics row (step = its ``round``) to every tracker."""
        step = int(row.get("round", 0))
        for name, tracker in list(self.active):
            try:
                tracker.log(row, step)
            except Exception as exc:  # a tracker must not stop the run
                self._drop(name, exc)

    def close(self) -> None:
        """Close every tracker."""
        for name, tracker in list(self.active):
            try:
                tracker.close()
            except Exception as exc:
                self._drop(name, exc)
        self.active = []

    def _drop(self, name: str, exc: BaseException) -> None:
        print(
            f"emberfl: warning: --logger {name} failed and is off for the rest of the run: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        self.active = [(n, t) for n, t in self.active if n != name]


def open_trackers(
    names: Sequence[str],
    run_dir: Path,
    config: Mapping[str, Any],
    config_text: str,
    *,
    start_round: int,
) -> Trackers:
    """Open the named trackers for a run (or its continuation).

    Args:
        names: Some of :data:`LOGGERS`.
        run_dir: The run directory.
        config: The run's configuration (``config.toml``'s keys).
        config_text: ``config.toml``'s text.
        start_round: The round the run starts from (0, or the checkpoint's when resumed).

    Returns:
        The trackers.

    Raises:
        ConfigError: For an unknown name or a tracker whose package is missing (the
            message names the pip command).
    """
    ids_path = run_dir / TRACKERS_FILE
    ids: dict[str, str] = {}
    if ids_path.is_file():
        try:
            loaded = json.loads(ids_path.read_text(encoding="utf-8"))
            ids = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            ids = {}
    opened: list[tuple[str, Tracker]] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append((name, _TensorBoard(run_dir, config_text, start_round)))
            elif name == "wandb":
                opened.append((name, _WandB(run_dir, config, ids)))
            elif name == "mlflow":
                opened.append((name, _MLflow(run_dir, config, ids)))
            else:
                raise ConfigError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    except BaseException:
        Trackers(opened).close()
        raise
    if ids:
        atomic_write_text(ids_path, json.dumps(ids, sort_keys=True) + "\n")
    return Trackers(opened)
