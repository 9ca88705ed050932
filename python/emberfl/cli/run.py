"""The experiment loop behind ``emberfl run``.

:func:`run_experiment` loads the data set, partitions it, writes the run directory's
``config.toml`` and partition report, then runs the chosen algorithm
(:data:`emberfl.algorithms.ALGORITHMS`) round by round with a
:class:`~emberfl.simulation.Simulation` and the executor of the chosen mode: it logs each
round's metrics, checkpoints every ``checkpoint_every`` rounds and after the last one, and
saves the final global model as ``final_model.safetensors``. With ``resume=True`` it
continues a killed run from its last checkpoint; the result is bitwise identical to an
uninterrupted run.

What carries over between rounds, and is therefore checkpointed: the global model, the
round counter (it keys the client-sampling and client-training streams), the algorithm's
server tensors and the client state store (:meth:`Simulation.state_tensors`), and a server
generator suite kept for the checkpoint format. Clients start every round from the
broadcast and their own stream, so they keep nothing else.

Layout of a run directory::

    RUN_DIR/config.toml              effective configuration (a valid --config file)
    RUN_DIR/partition.csv            class counts per client
    RUN_DIR/partition.png            heatmap of the partition
    RUN_DIR/clients.csv              data sets split by user (LEAF's): each client's user
    RUN_DIR/metrics.jsonl            one JSON object per round
    RUN_DIR/metrics.csv              the same, as CSV
    RUN_DIR/staleness.csv            asynchronous runs: reports per staleness
    RUN_DIR/checkpoint/              the last checkpoint (see emberfl.cli.checkpoint)
    RUN_DIR/final_model.safetensors  the final global model's state dict
    RUN_DIR/error.log                tracebacks of failed commands (written by emberfl.cli)

Before any training the run directory and its ``checkpoint/`` folder are created and
probed with a test write, so a folder that cannot be written (a file in its place, no
permission, a full disk) fails the run at once with a :class:`ConfigError`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import csv
import dataclasses
import datetime
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from emberfl.algorithms import LocalSGD, Split
from emberfl.asynchronous import AsyncSimulation
from emberfl.atomic import atomic_write_text, name_os_errors
from emberfl.attacks import flip_labels, malicious_clients
from emberfl.cli.checkpoint import (
    CHECKPOINT_DIR,
    STATE_FILE,
    Checkpoint,
    atomic_write_bytes,
    load_checkpoint,
    prepare_checkpoint_dir,
    save_checkpoint,
    save_model_file,
)
from emberfl.cli.config import (
    ALGORITHM_OPTIONS,
    RESUME_OVERRIDABLE,
    RunConfig,
    build_aggregator,
    build_algorithm,
    build_async,
    build_attack,
    build_compressor,
    config_to_toml,
    load_config_file,
    merge_config,
    partition_options,
    resolve_device,
    unreadable_reason,
)
from emberfl.cli.metrics import TRAIN_EVAL_SAMPLES, MetricsLog, format_summary
from emberfl.cli.ranks import Ranks, Watchdog, agree, digest, join, on_leader, share
from emberfl.cli.trackers import open_trackers, require_trackers
from emberfl.core import deserialize_model, intra_op_threads, serialize_model
from emberfl.data import (
    FLDataset,
    Partition,
    class_counts,
    load_dataset,
    partition,
    plot_partition_heatmap,
    read_partition_csv,
    write_partition_csv,
)
from emberfl.data.partitioned import (
    TensorPartitionedDataset,
    TensorSplit,
    as_model_input,
    client_test_rows,
)
from emberfl.data.skew import CropFlip, add_feature_noise
from emberfl.errors import CheckpointError, ConfigError, EmberflError
from emberfl.evaluation import evaluate
from emberfl.executors import ClientSetup, make_executor
from emberfl.executors.distributed import DistributedExecutor
from emberfl.models import Models
from emberfl.nn import use_fast_layers
from emberfl.privacy import epsilon, local_epsilon
from emberfl.reproducibility import RNGSuite, create_rng_suite
from emberfl.rng import Purpose, stream
from emberfl.simulation import Simulation

__all__ = [
    "CONFIG_FILE",
    "FINAL_MODEL_FILE",
    "PARTITION_CSV",
    "PARTITION_PNG",
    "STALENESS_CSV",
    "RunResult",
    "default_run_dir",
    "file_in_the_way",
    "final_model_metadata",
    "load_run_config",
    "read_staleness",
    "resume_config",
    "run_experiment",
]

CONFIG_FILE = "config.toml"
"""The effective configuration inside a run directory."""
FINAL_MODEL_FILE = "final_model.safetensors"
"""The final global model inside a run directory."""
PARTITION_CSV = "partition.csv"
"""The partition's class counts inside a run directory."""
PARTITION_PNG = "partition.png"
"""The partition heatmap inside a run directory."""
DP_STEPS = "dp/steps"
"""Checkpoint tensor of local DP-SGD's steps per client."""
STALENESS_CSV = "staleness.csv"
"""Asynchronous runs: how many reports arrived with each staleness, up to the checkpoint."""
EVAL_BATCH_SIZE = 512
"""Batch size of the server-side evaluations (does not change any result)."""

_T = TypeVar("_T")


@dataclass
class RunResult:
    """What :func:`run_experiment` produced.

    Attributes:
        run_dir: The run directory.
        config: The effective configuration.
        metrics: One row per round (see :mod:`emberfl.cli.metrics`).
        final_model: Path of ``final_model.safetensors``.
        resumed_from: The checkpoint round the run continued from (``None``: fresh run).
    """

    run_dir: Path
    config: RunConfig
    metrics: list[dict[str, Any]]
    final_model: Path
    resumed_from: int | None = None


# --------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------


class _Progress:
    """tqdm bars on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=sys.stderr, disable=not self.enabled, dynamic_ncols=True, **kwargs)

    def wrap(self, it: list[_T], round_: int) -> Iterable[_T]:
        if not self.enabled:
            return it
        return self.bar(  # type: ignore[no-any-return]
            iterable=it, total=len(it), desc=f"round {round_ + 1}", unit="client", leave=False
        )


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def default_run_dir(config: RunConfig, *, root: Path = Path("runs")) -> Path:
    """Return a fresh ``runs/<dataset>-<algorithm>-<YYYYmmdd-HHMMSS>`` path.

    Args:
        config: The configuration.
        root: The parent folder.

    Returns:
        A path that does not exist yet (``-2``, ``-3``, ... appended if needed).
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{config.dataset}-{config.algorithm}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """Read ``RUN_DIR/config.toml``.

    Args:
        run_dir: The run directory.

    Returns:
        Its ``{key: value}`` table.

    Raises:
        ConfigError: If ``run_dir`` is not a run directory.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not an emberfl run directory (no {CONFIG_FILE}); pass the folder "
            "an earlier `emberfl run` wrote"
        )
    return load_config_file(path)


def file_in_the_way(path: Path) -> Path | None:
    """Return the file that stops ``path`` from being (or being created as) a folder.

    Args:
        path: A path that should be a folder.

    Returns:
        ``path`` itself or the nearest existing path above it, when that is not a folder;
        ``None`` when nothing is in the way.
    """
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def _prepare_dirs(path: Path, *, resume: bool) -> None:
    """Create the run directory and its checkpoint folder and check that both are writable.

    Raises:
        ConfigError: If either cannot be created or written, naming the folder, why and
            what to do.
    """
    ckpt = path / CHECKPOINT_DIR
    if not resume and ((path / CONFIG_FILE).exists() or (ckpt / STATE_FILE).exists()):
        raise ConfigError(
            f"{path} already holds a run: continue it with `emberfl run --resume {path}` or "
            "choose another --output-dir"
        )
    for folder, what in ((path, "output directory"), (ckpt, "checkpoint folder")):
        blocker = file_in_the_way(folder)
        if blocker is not None:
            other = "" if resume else " or choose another --output-dir"
            raise ConfigError(
                f"cannot create {what} {folder}: {blocker} is a file, not a folder; move it "
                f"away{other}"
            )
    fix = (
        "make it writable (permissions, disk space) and resume again"
        if resume
        else "choose another --output-dir"
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".emberfl-write-test"
        with name_os_errors(probe):
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to output directory {path}: {exc.strerror or exc}; {fix}"
        ) from None
    try:
        prepare_checkpoint_dir(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to checkpoint folder {ckpt}: {exc.strerror or exc}; {fix}"
        ) from None


def _load_data(config: RunConfig) -> FLDataset:
    on_disk = config.dataset not in ("digits", "synthetic-cifar10", "synthetic", "fcube")
    if on_disk and config.data_root is None:
        raise ConfigError(
            f"data set {config.dataset!r} is read from disk and nothing is downloaded: pass "
            "--data-root FOLDER (or use --dataset digits, which works offline)"
        )
    if on_disk and not Path(config.data_root or "").expanduser().is_dir():
        raise ConfigError(
            f"--data-root {config.data_root} is not a folder; pass the folder that holds the "
            f"{config.dataset} files"
        )
    # A generated data set is generated at the requested size (its samples are i.i.d. and
    # its classes balanced); the others are subsampled.
    generate = config.dataset in ("synthetic-cifar10", "fcube") and config.train_size is not None
    options: dict[str, Any] = {"num_train": config.train_size} if generate else {}
    if config.dataset == "synthetic":
        options = {
            "num_clients": config.num_clients,
            "alpha": 1.0 if config.synthetic_alpha is None else float(config.synthetic_alpha),
            "beta": 1.0 if config.synthetic_beta is None else float(config.synthetic_beta),
        }
    try:
        data = load_dataset(
            config.dataset,
            data_root=config.data_root if on_disk else None,
            seed=config.seed,
            **options,
        )
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise
        raise ConfigError(
            f"data set {config.dataset!r} needs torchvision: pip install 'emberfl[vision]'"
        ) from None
    if config.train_size is not None and not generate:
        data = _subsample(data, config.train_size, config.seed)
    return data


CLIENTS_CSV = "clients.csv"
"""The run file naming each client's user, for data sets that come split by user."""


class _NoLog(MetricsLog):
    """The metrics log of a rank other than 0: rank 0 writes the files."""

    def __init__(self) -> None:
        super().__init__(".")

    def reset(self, rows: Sequence[Any]) -> None:
        """Write nothing."""

    def append(self, row: Any) -> None:
        """Write nothing."""


def _first_clients(data: FLDataset, num_clients: int) -> FLDataset:
    """Keep the samples of a naturally split data set's first ``num_clients`` clients.

    Raises:
        ConfigError: If the data set has fewer clients.
    """
    assert data.train_owner is not None
    available = int(data.train_owner.max()) + 1 if data.num_train else 0
    if data.client_names is not None:
        available = len(data.client_names)
    if num_clients > available:
        raise ConfigError(
            f"{data.name} has {available} clients (users) but --num-clients is {num_clients}: "
            f"pass --num-clients {available} or fewer"
        )
    if num_clients == available:
        return data
    keep = torch.nonzero(data.train_owner < num_clients).squeeze(1)
    names = data.client_names[:num_clients] if data.client_names is not None else None
    return dataclasses.replace(
        data,
        train_x=data.train_x[keep].contiguous(),
        train_y=data.train_y[keep].contiguous(),
        train_owner=data.train_owner[keep].contiguous(),
        client_names=names,
    )


def _subsample(data: FLDataset, size: int, seed: int) -> FLDataset:
    """Keep ``size`` training samples, drawn without replacement from the seed's stream."""
    if size > data.num_train:
        raise ConfigError(
            f"--train-size {size} is larger than {data.name}'s {data.num_train} training samples"
        )
    draw = stream(seed, purpose=Purpose.SUBSAMPLE).choice(data.num_train, size)
    index = torch.from_numpy(np.sort(draw).astype(np.int64))
    return dataclasses.replace(
        data, train_x=data.train_x[index].contiguous(), train_y=data.train_y[index].contiguous()
    )


def _train_eval_loader(dataset: FLDataset) -> DataLoader[Any]:
    n = dataset.num_train
    index = None
    if n > TRAIN_EVAL_SAMPLES:
        index = torch.from_numpy(np.linspace(0, n - 1, TRAIN_EVAL_SAMPLES).astype(np.int64))
    split = TensorSplit(dataset.train_x, dataset.train_y, index)
    # A private generator: a DataLoader draws a seed from it on every pass, and would
    # otherwise draw from PyTorch's global generator.
    return DataLoader(
        split,
        batch_size=EVAL_BATCH_SIZE,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),
    )


def _identity(batch: Any) -> Any:
    return batch


def _check_resumed_config(saved: dict[str, Any], config: RunConfig, where: str) -> None:
    current = config_to_toml(config)
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_OVERRIDABLE:
            continue
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{where} was written for {key}={saved.get(key)!r}, but the run's "
                f"config.toml has {key}={current.get(key)!r}; restore config.toml or delete "
                "the checkpoint folder"
            )


def _device_kind(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu" if device == "cpu" else "cuda"


def _check_same_bits(saved: Mapping[str, Any], config: RunConfig, run_dir: Path) -> None:
    """Refuse a resume whose mode, chunking or device would change the results' bits.

    Serial, thread and process modes give bitwise equal results at any parallelism, so
    switching among them is fine; vectorized mode equals them only up to float rounding,
    and in vectorized mode so does another chunk split; CPU and CUDA kernels differ too.

    Raises:
        ConfigError: Naming what changed, why it matters and the option to resume with.
    """
    where = f"the checkpoint in {run_dir / CHECKPOINT_DIR}"
    before = str(saved.get("mode", config.mode))
    if (before == "vectorized") != (config.mode == "vectorized"):
        again = "vectorized" if before == "vectorized" else "serial, thread or process"
        raise ConfigError(
            f"--mode {config.mode} cannot resume {where}: it was written in {before} mode, "
            "and vectorized mode gives other bits than serial, thread and process mode "
            "(equal only up to float rounding), so the resumed run would match neither; "
            f"resume with --mode {again}"
        )
    if config.mode == "vectorized":
        chunk = saved.get("chunk_size")
        if chunk != config.chunk_size:
            shown = "unset" if chunk is None else chunk
            again = "without --chunk-size" if chunk is None else f"with --chunk-size {chunk}"
            raise ConfigError(
                f"--chunk-size {config.chunk_size} cannot resume {where}: it was written with "
                f"chunk_size {shown}, and vectorized mode's results depend on the chunk split "
                f"(up to float rounding); resume {again}"
            )
        parallelism = saved.get("parallelism", config.parallelism)
        if (
            chunk is None
            and isinstance(parallelism, int)
            and resolve_device(config.device) == "cpu"
        ):
            earlier = dataclasses.replace(config, parallelism=parallelism).workers()
            if earlier != config.workers():
                raise ConfigError(
                    f"--parallelism {config.parallelism} cannot resume {where}: with "
                    f"chunk_size unset, vectorized mode on the CPU splits a round by the "
                    f"parallelism, and the run used {earlier} (this resume: "
                    f"{config.workers()}), which changes the results up to float rounding; "
                    f"resume with --parallelism {earlier}"
                )
    device_before = str(saved.get("device", config.device))
    kind_before, kind_now = _device_kind(device_before), _device_kind(config.device)
    if kind_before != kind_now:
        raise ConfigError(
            f"--device {config.device} cannot resume {where}: it was written on {kind_before} "
            f"(device {device_before!r}), and {kind_before} and {kind_now} kernels give "
            f"different bits; resume with --device {device_before}"
        )


def _rng_state(suite: RNGSuite) -> dict[str, Any]:
    version, internal, gauss = suite.python.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": suite.numpy.bit_generator.state,
        "torch_cpu": base64.b64encode(suite.torch_cpu.get_state().numpy().tobytes()).decode(),
    }
    if suite.torch_cuda is not None:
        cuda = suite.torch_cuda.get_state().numpy().tobytes()
        state["torch_cuda"] = base64.b64encode(cuda).decode()
    return state


def _restore_rng(suite: RNGSuite, state: dict[str, Any]) -> None:
    def as_tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            suite.python.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            suite.numpy.bit_generator.state = state["numpy"]
        if "torch_cpu" in state:
            suite.torch_cpu.set_state(as_tensor(state["torch_cpu"]))
        if "torch_cuda" in state and suite.torch_cuda is not None:
            suite.torch_cuda.set_state(as_tensor(state["torch_cuda"]))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's generator states are malformed ({exc})") from None


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise CheckpointError(
            f"the checkpoint's tensors do not match model {name!r} (missing {missing}, "
            f"unexpected {extra}); it was written for another model"
        )
    for key, tensor in expected.items():
        got = state[key]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                f"checkpoint tensor {key!r} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                f"but model {name!r} expects {tuple(tensor.shape)} and {tensor.dtype}"
            )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _build_simulation(
    config: RunConfig,
    models: Models,
    dataset: TensorPartitionedDataset,
    device: str,
    *,
    distributed: bool = False,
) -> Simulation | AsyncSimulation:
    algorithm = build_algorithm(config)
    setup = ClientSetup(
        dataset=dataset,
        model=models.select_model(config.model),
        batch_size=config.batch_size,
        seed=config.seed,
        device=device,
    )
    options: dict[str, Any] = {"client_timeout": config.timeout_seconds()}
    if config.mode == "vectorized":
        options["chunk_size"] = config.chunk_size
    executor = make_executor(config.mode, setup, parallelism=config.workers(), **options)
    if config.mode == "process":
        executor.start()  # type: ignore[attr-defined]
    if distributed:
        if config.is_async():
            raise ConfigError(
                "asynchronous algorithms run on one machine for now: launch them without torchrun"
            )
        executor = DistributedExecutor(executor)
    if config.is_async():
        server, clock, concurrency = build_async(config)
        return AsyncSimulation(
            algorithm,
            executor,
            server,
            num_clients=config.num_clients,
            concurrency=concurrency,
            clock=clock,
        )
    return Simulation(
        algorithm,
        executor,
        num_clients=config.num_clients,
        clients_per_round=config.clients_per_round(),
        selection="poisson" if config.dp == "central" else config.client_selection,  # type: ignore[arg-type]
        poc_candidates=config.poc_candidates,
        aggregator=build_aggregator(config),
        attack=build_attack(config),
    )


def _client_test_metrics(
    sim: Simulation | AsyncSimulation,
    model: torch.nn.Module,
    pdata: TensorPartitionedDataset,
    device: str,
) -> dict[str, float]:
    """The global model (and, for personalised algorithms, each client's own model) on
    the clients' own test splits, all held-out samples together."""
    _, global_acc = evaluate(model, pdata.held_out_loader(EVAL_BATCH_SIZE), device)
    out = {"client_test_accuracy": global_acc}
    if isinstance(sim, AsyncSimulation) or not sim.algorithm.personalised:
        return out
    algorithm, store = sim.algorithm, sim.client_state
    own = copy.deepcopy(model)
    setup = sim.executor.setup
    correct = total = 0
    for cid, rows in enumerate(pdata.client_test_index):
        if rows.numel() == 0:
            continue
        judged = model
        if algorithm.adapts:
            own.load_state_dict(model.state_dict())
            seed = stream(setup.seed, purpose=Purpose.EVALUATION, client=cid, round=sim.round)
            generator = torch.Generator().manual_seed(seed.torch_seed())
            loader = pdata.get_dataloader(Split.TRAIN, cid, setup.batch_size, generator)
            batch = next(iter(loader), None)
            if batch is not None:
                algorithm.adapt(own, batch)
            judged = own
        elif store is not None and store.is_written(cid):
            flat = algorithm.personal_model(store.views(cid), sim.state, sim.layout)
            if flat is not None:
                deserialize_model(own, flat)
                judged = own
        test = pdata.get_dataloader(Split.TEST, cid, batch_size=EVAL_BATCH_SIZE)
        _, acc = evaluate(judged, test, device)
        correct += round(acc * len(rows))
        total += len(rows)
    out["personal_test_accuracy"] = correct / total if total else 0.0
    return out


def _dp_steps(sim: Simulation, cids: list[int], batch_size: int) -> np.ndarray[Any, Any]:
    """The local DP-SGD steps each client takes in the coming round: its epochs
    (:meth:`LocalSGD.work`, stragglers included) times its batches; 0 for the others and
    for dropped clients."""
    steps = np.zeros(sim.num_clients, dtype=np.int64)
    algorithm = sim.algorithm
    inner = getattr(algorithm, "inner", algorithm)
    seed, round_ = sim.executor.setup.seed, sim.round
    sizes = sim.client_sizes()
    for cid in cids:
        if algorithm.drops(seed, cid, round_):
            continue
        epochs = inner.work(seed, cid, round_) if isinstance(inner, LocalSGD) else 1
        steps[cid] = epochs * math.ceil(sizes[cid] / batch_size)
    return steps


def _say(out: TextIO, config: RunConfig, text: str) -> None:
    if not config.quiet:
        print(text, file=out, flush=True)


def _describe(config: RunConfig, data: FLDataset, device: str, options: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    part = f"{config.partition}({opts})" if opts else config.partition
    if config.augments():
        part += ", crop-and-flip augmentation"
    workers = "" if config.mode == "serial" else f" x{config.workers()}"
    if config.mode == "vectorized":
        workers += f" (chunk {config.chunk_size or 'auto'})"
    limit = config.timeout_seconds()
    timeout = f"client timeout {limit:g} s" if limit is not None else "no client timeout"
    given = {k: getattr(config, k) for k in ALGORITHM_OPTIONS[config.algorithm]}
    given |= {"momentum": config.momentum, "weight_decay": config.weight_decay}
    if config.optimizer != "sgd":
        given["optimizer"] = config.optimizer
        given |= {"adam_betas": config.adam_betas, "adam_eps": config.adam_eps}
    given["stragglers"] = config.stragglers
    given["drop_stragglers"] = config.drop_stragglers
    if config.is_async():
        server, clock, concurrency = build_async(config)
        given = {**dataclasses.asdict(server), "concurrency": concurrency}
        given |= {"momentum": config.momentum, "weight_decay": config.weight_decay}
        given["client_speed"] = f"lognormal:{clock.mu:g},{clock.sigma:g}"
    shown = ", ".join(f"{k}={v}" for k, v in given.items() if v)
    algorithm = f"{config.algorithm}({shown})" if shown else config.algorithm
    if config.aggregator != "mean":
        algorithm += f", {config.aggregator} aggregation"
        if config.aggregator in ("krum", "multi-krum", "bulyan"):
            algorithm += f" (f={config.robust_f()})"
    if config.compression != "none":
        compressor = build_compressor(config)
        algorithm += f", {compressor.describe() if compressor else ''} uplink"
        if not config.error_feedback:
            algorithm += " without error feedback"
    if config.dp == "central":
        sigma, clip, delta = config.dp_parameters()
        target = ""
        if config.dp_target_epsilon is not None:
            target = f" for epsilon {config.dp_target_epsilon:g} after {config.rounds} rounds"
        algorithm += (
            f", client-level DP (sigma {sigma:.4g}{target}, clip {clip}, delta {delta:g}, "
            f"Poisson sampling q={config.sample_rate():.3g})"
        )
    if config.dp == "local":
        sigma, clip, delta = config.dp_parameters()
        algorithm += f", local DP-SGD (sigma {sigma}, per-sample clip {clip}, delta {delta:g})"
    if config.attack != "none":
        algorithm += f", {config.attack} attack by {config.malicious_fraction} of the clients"
    if config.client_selection != "uniform":
        algorithm += f", {config.client_selection} client selection"
        if config.poc_candidates is not None:
            algorithm += f" of {config.poc_candidates} candidates"
    plan = f"{config.rounds} rounds x {config.clients_per_round()} clients"
    if config.is_async():
        plan = f"{config.rounds} server updates, {config.async_concurrency()} clients in flight"
    return (
        f"{algorithm}: {config.model} on {data.name} ({data.num_train} train / "
        f"{data.num_test} test), {config.num_clients} clients, {part}; {plan}"
        f"{', ' if config.is_async() else ' x '}{config.epochs} epochs, batch "
        f"{config.batch_size}, lr {config.lr}; {config.mode}{workers} on {device}, "
        f"{timeout}, seed {config.seed}"
    )


def _write_staleness(run_dir: Path, staleness: list[int]) -> None:
    counts = np.bincount(np.asarray(staleness, dtype=np.int64)).tolist() if staleness else []
    lines = ["staleness,reports", *(f"{s},{n}" for s, n in enumerate(counts))]
    atomic_write_text(run_dir / STALENESS_CSV, "\n".join(lines) + "\n")


def read_staleness(path: Path) -> list[tuple[int, int]]:
    """Read ``staleness.csv`` as ``(staleness, reports)`` pairs.

    Raises:
        ValueError: If the file is not such a table.
        OSError: If it cannot be read.
    """
    lines = path.read_text(encoding="utf-8").split()
    if not lines or lines[0] != "staleness,reports":
        raise ValueError(f"{path.name} lacks its staleness,reports header")
    pairs = []
    for line in lines[1:]:
        left, _, right = line.partition(",")
        pairs.append((int(left), int(right)))
    return pairs


def _write_partition_report(
    run_dir: Path, counts: np.ndarray[Any, np.dtype[np.int64]], *, resume: bool
) -> None:
    csv_path = run_dir / PARTITION_CSV
    png_path = run_dir / PARTITION_PNG
    if resume and csv_path.exists():
        try:
            saved = read_partition_csv(csv_path)
        except (EmberflError, ValueError, OSError) as exc:
            raise CheckpointError(
                f"cannot read {csv_path}: {unreadable_reason(exc)}; delete it and resume "
                f"again: `emberfl run --resume {run_dir}` rewrites it from config.toml"
            ) from None
        if not np.array_equal(saved, counts):
            raise CheckpointError(
                f"the partition rebuilt from config.toml differs from {csv_path}: the data set "
                "or emberfl's partitioner changed since the run started, so it cannot resume"
            )
        if not png_path.exists():
            with name_os_errors(png_path):
                plot_partition_heatmap(png_path, counts)
        return
    with name_os_errors(csv_path):
        write_partition_csv(csv_path, counts)
    with name_os_errors(png_path):
        plot_partition_heatmap(png_path, counts)


def run_experiment(
    config: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    out: TextIO | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Run (or resume) an experiment and write its results to a run directory.

    Args:
        config: The configuration (validated again here).
        run_dir: The run directory; ``config.output_dir`` or :func:`default_run_dir` if
            ``None``.
        resume: Continue the run in ``run_dir`` from its checkpoint (from round 0 if it has
            none). ``config`` must be the run's ``config.toml`` (with only the keys of
            :data:`~emberfl.cli.config.RESUME_OVERRIDABLE` changed).
        out: Where the header, the summary table and the results line go (stdout).
        progress: Show progress bars; by default only when stderr is a terminal and the
            run is not quiet.

    Returns:
        The run's results.

    Raises:
        ConfigError: For an invalid configuration, an impossible model or data set, an
            output directory or checkpoint folder that cannot be written (checked before
            training), or a resume whose mode, chunking or device would change the bits.
        PartitionError: If the partition cannot be made.
        DatasetNotFoundError: If an on-disk data set is missing.
        CheckpointError: If the checkpoint to resume from is corrupt or does not match.
        CheckpointSaveError: If a checkpoint could not be written (a full disk); the
            previous checkpoint is kept.
        ClientError: If a client's training raised or ran out of time.
        OSError: If another file of the run could not be written (``filename`` names it).
        KeyboardInterrupt: On Ctrl-C; the last checkpoint is kept.

    Under ``torchrun`` every rank runs this with the same configuration: the ranks share
    each round's clients (:class:`~emberfl.executors.distributed.DistributedExecutor`),
    rank 0 writes the run directory and evaluates, and the others keep nothing.
    """
    config.validate()
    ranks = join()
    if ranks is None:
        return _run_experiment(config, run_dir, resume, out, progress, None, None)
    # Heartbeats from the start: a rank that hangs while loading data is caught too.
    watchdog = Watchdog(ranks, config.rank_timeout)
    try:
        return _run_experiment(config, run_dir, resume, out, progress, ranks, watchdog)
    finally:
        watchdog.finish()
        ranks.close()


def _run_experiment(
    config: RunConfig,
    run_dir: Path | None,
    resume: bool,
    out: TextIO | None,
    progress: bool | None,
    ranks: Ranks | None,
    watchdog: Watchdog | None,
) -> RunResult:
    leader = ranks is None or ranks.leader
    stream = out if out is not None and leader else (sys.stdout if leader else io.StringIO())
    device = resolve_device(config.device)
    wants_bars = not config.quiet and sys.stderr.isatty()
    show = leader and (progress if progress is not None else wants_bars)
    bars = _Progress(show)
    if ranks is not None:
        # parallelism, device, quiet, the client timeout and the exact modes (serial,
        # thread, process: the same bits) may differ between ranks.
        own = {"parallelism", "device", "quiet", "client_timeout", "output_dir", "mode"}
        shared = {k: v for k, v in config_to_toml(config).items() if k not in own}
        shared["vectorized"] = config.mode == "vectorized"
        agree(ranks, "configurations", digest(sorted(shared.items()), resume))
        if device == "cuda" and torch.cuda.device_count() > 1:
            device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"  # a GPU per rank

    data = _load_data(config)
    options: dict[str, Any] = dict(partition_options(config, data.num_train))
    config = dataclasses.replace(config, **options)
    if config.partition == "natural" and data.train_owner is not None:
        data = _first_clients(data, config.num_clients)
    labels = data.train_y.numpy()
    parts: Partition
    if config.partition == "natural" and data.train_owner is not None:
        parts = Partition.from_owner(data.train_owner.numpy(), config.num_clients)
    elif config.partition == "feature-noise":
        parts = partition(labels, config.num_clients, method="iid", seed=config.seed)
    else:
        parts = partition(
            labels, config.num_clients, method=config.partition, seed=config.seed, **options
        )
    counts = class_counts(labels, parts, data.num_classes)
    if ranks is not None:
        step = max(1, data.num_train // 64)
        agree(ranks, "data", digest(data.train_y, data.test_y, data.train_x[::step], counts))
    models = Models(
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=config.seed,
        hidden_sizes=tuple(config.hidden_sizes or (200, 200)),
        vocab_size=data.vocab_size,
    )
    probe = models.select_model(config.model)  # fail early on a model/input-shape mismatch
    if config.dp == "local":
        from emberfl.privacy import DPSGD

        DPSGD(*config.dp_parameters()[:2]).check_model(probe)

    if run_dir is None and leader:
        run_dir = Path(config.output_dir) if config.output_dir else default_run_dir(config)
    if ranks is not None:
        run_dir = share(ranks, run_dir)
    if watchdog is not None:
        hint = f"resume with the same torchrun command and `emberfl run --resume {run_dir}`"
        watchdog.resume_hint = hint
    assert run_dir is not None
    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is not None:
            _check_resumed_config(checkpoint.config, config, f"checkpoint in {run_dir}")
            _check_same_bits(checkpoint.config, config, run_dir)
            if checkpoint.round > config.rounds:
                raise ConfigError(
                    f"the checkpoint in {run_dir} is at round {checkpoint.round}, beyond "
                    f"rounds={config.rounds}; pass --rounds {checkpoint.round} or more"
                )
    shared_dir = run_dir
    if not leader:
        config = dataclasses.replace(config, logger=None)  # rank 0 logs
    if config.logger:
        require_trackers(config.logger)
    toml_bytes = _toml_bytes(config)
    names = data.client_names

    def write_run_dir() -> None:  # only rank 0 writes the run directory
        _prepare_dirs(shared_dir, resume=resume)
        atomic_write_bytes(shared_dir / CONFIG_FILE, toml_bytes)
        _write_partition_report(shared_dir, counts, resume=resume)
        if names is not None:
            # Which of the data set's users each client is (LEAF's user ids).
            table = io.StringIO()
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(["client", "user"])
            writer.writerows(enumerate(names))
            atomic_write_text(shared_dir / CLIENTS_CSV, table.getvalue())

    on_leader(ranks, write_run_dir)

    start_round = checkpoint.round if checkpoint is not None else 0
    _say(stream, config, _describe(config, data, device, options))
    if resume:
        _say(
            stream,
            config,
            f"resuming {run_dir} from round {start_round}"
            if checkpoint is not None
            else f"no checkpoint in {run_dir}: starting it again from round 0",
        )

    if config.partition == "feature-noise":
        index = [torch.from_numpy(np.asarray(ix).copy()) for ix in parts]
        noisy = add_feature_noise(
            as_model_input(data.train_x), index, float(options["noise"]), config.seed
        )
        data = dataclasses.replace(data, train_x=noisy, test_x=as_model_input(data.test_x))
    client_tests = None
    if config.partition == "natural" and data.test_owner is not None:
        client_tests = client_test_rows(data.test_owner, config.num_clients)
    pdata = TensorPartitionedDataset(
        data,
        parts,
        client_test_fraction=config.test_fraction(),
        seed=config.seed,
        augment=CropFlip() if config.augments() else None,
        client_tests=client_tests,
    )
    if config.attack == "label-flip" and config.malicious_fraction is not None:
        bad = malicious_clients(config.seed, config.num_clients, float(config.malicious_fraction))
        flip_labels(pdata, bad, data.num_classes)
    sim = _build_simulation(config, models, pdata, device, distributed=ranks is not None)
    # The global model for evaluation and for the files; the simulation's flat state is
    # loaded into it after each round.
    model = models.select_model(config.model)
    use_fast_layers(model)
    rng_suite = create_rng_suite(config.seed)
    metrics: list[dict[str, Any]] = []
    elapsed_before = 0.0
    # Local DP-SGD's accounting: every client's steps so far (checkpointed as dp/steps).
    dp_steps = np.zeros(config.num_clients, dtype=np.int64)
    if checkpoint is not None:
        _load_model_state(model, checkpoint.model_state, config.model)
        _restore_rng(rng_suite, checkpoint.rng)
        saved = dict(checkpoint.tensors)
        if config.dp == "local":
            steps_saved = saved.pop(DP_STEPS, None)
            if steps_saved is None or tuple(steps_saved.shape) != (config.num_clients,):
                raise CheckpointError(
                    f"the checkpoint in {run_dir} lacks local DP-SGD's step counts ({DP_STEPS}) "
                    "for every client, so the privacy spent cannot be accounted; start again"
                )
            dp_steps = steps_saved.numpy().astype(np.int64)
        tensors = {"server/model": serialize_model(model).to(torch.float32), **saved}
        sim.load_state_tensors(tensors, checkpoint.round)
        metrics = list(checkpoint.metrics)
        elapsed_before = checkpoint.wall_time_s
    log = MetricsLog(run_dir) if leader else _NoLog()
    log.reset(metrics)
    trackers = open_trackers(
        config.logger or [],
        run_dir,
        config_to_toml(config),
        toml_bytes.decode(),
        start_round=start_round,
    )
    train_loader = _train_eval_loader(data)
    # The suite's generator (never the global one) drives the loader's per-pass draw.
    test_loader = pdata.get_dataloader(
        Split.TEST, None, batch_size=EVAL_BATCH_SIZE, generator=rng_suite.torch_cpu
    )
    started = time.perf_counter()

    def wall_time() -> float:
        return elapsed_before + time.perf_counter() - started

    def checkpoint_now() -> None:
        if not leader:
            return
        if isinstance(sim, AsyncSimulation):
            _write_staleness(run_dir, sim.staleness)
        extra = {k: v for k, v in sim.state_tensors().items() if k != "server/model"}
        if config.dp == "local":
            extra[DP_STEPS] = torch.from_numpy(dp_steps.copy())
        save_checkpoint(
            run_dir,
            Checkpoint(
                round=sim.round,
                model_state=model.state_dict(),
                config=config_to_toml(config),
                metrics=metrics,
                rng=_rng_state(rng_suite),
                wall_time_s=wall_time(),
                tensors=extra,
            ),
        )

    # One intra-op thread, as the clients use: evaluation and aggregation on a busy machine
    # are many times slower with OpenMP threads spinning against each other. A Ctrl-C
    # (KeyboardInterrupt) goes to the caller; the last checkpoint stays as it was.
    with sim, intra_op_threads(1), contextlib.closing(trackers):
        round_bar = bars.bar(total=config.rounds, initial=start_round, desc="rounds", unit="round")
        with round_bar:
            while sim.round < config.rounds:
                round_start = time.perf_counter()
                if isinstance(sim, AsyncSimulation):
                    summary = sim.step()
                    summary["num_clients"] = summary["reports"]
                else:
                    cids = sim.sample_clients()
                    if config.dp == "local":
                        dp_steps += _dp_steps(sim, cids, config.batch_size)
                    with bars.bar(
                        total=len(cids), desc=f"round {sim.round + 1}", unit="client", leave=False
                    ) as client_bar:
                        summary = sim.run_round(cids, on_result=lambda _p, _c: client_bar.update(1))
                sim.load_global_into(model)
                eval_start = time.perf_counter()
                # Under torchrun the ranks share the evaluation, with the same bits.
                shard = (ranks.rank, ranks.world_size) if ranks is not None else None
                test_loss, test_acc = evaluate(model, test_loader, device, shard=shard)
                train_loss, train_acc = evaluate(model, train_loader, device, shard=shard)
                eval_s = time.perf_counter() - eval_start
                row: dict[str, Any] = {
                    "round": sim.round,
                    "wall_time_s": round(wall_time(), 3),
                    "round_time_s": round(time.perf_counter() - round_start, 3),
                    "num_clients": int(summary["num_clients"]),
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "client_loss": summary.get("train_loss"),
                    "uplink_bytes": int(summary["uplink_bytes"]),
                    "downlink_bytes": int(summary["downlink_bytes"]),
                }
                if ranks is not None and isinstance(sim.executor, DistributedExecutor):
                    # Where rank 0's round went: its share, waiting, the exchange, evaluation.
                    times = {**sim.executor.last_round, "eval_s": eval_s}
                    row.update({k: round(v, 4) for k, v in times.items()})
                    row["world_size"] = ranks.world_size
                if isinstance(sim, AsyncSimulation):
                    for key in ("virtual_time_s", "mean_staleness"):
                        row[key] = round(summary[key], 6)
                    row["max_staleness"] = int(summary["max_staleness"])
                if pdata.has_client_tests and leader:
                    row.update(_client_test_metrics(sim, model, pdata, device))
                if config.dp == "local":
                    sigma, _, delta = config.dp_parameters()
                    sizes = sim.client_sizes() if isinstance(sim, Simulation) else []
                    rates = [config.batch_size / n if n else 1.0 for n in sizes]
                    spent = list(zip(rates, dp_steps.tolist(), strict=True))
                    row["dp_epsilon"] = local_epsilon(sigma, spent, delta)
                if config.dp == "central" and isinstance(sim, Simulation):
                    sigma, _, delta = config.dp_parameters()
                    row["dp_epsilon"] = epsilon(sigma, config.sample_rate(), sim.round, delta)
                    if config.dp_adaptive_clip_quantile is not None:
                        row["dp_clip_norm"] = float(getattr(sim.aggregator, "clip_norm", 0.0))
                metrics.append(row)
                log.append(row)
                trackers.log(row)
                every = config.checkpoint_every
                if sim.round >= config.rounds or (every > 0 and sim.round % every == 0):
                    checkpoint_now()
                round_bar.set_postfix(test_acc=f"{100 * row['test_accuracy']:.1f}%")
                round_bar.update(1)

    final_path = shared_dir / FINAL_MODEL_FILE
    if leader:
        save_model_file(
            final_path,
            model.state_dict(),
            metadata=final_model_metadata(config, sim.round),
        )
    if config.quiet:
        print(run_dir, file=stream, flush=True)
    else:
        _say(stream, config, format_summary(metrics))
        _say(stream, config, f"results in {run_dir}")
    return RunResult(
        run_dir=shared_dir,
        config=config,
        metrics=metrics,
        final_model=final_path,
        resumed_from=start_round if resume else None,
    )


def final_model_metadata(config: RunConfig, round_: int) -> dict[str, str]:
    """Return the header metadata of ``final_model.safetensors``.

    It is one key holding sorted JSON: safetensors writes several metadata keys in an
    arbitrary order, which would make equal models give different bytes.

    Args:
        config: The run's configuration.
        round_: Rounds completed.

    Returns:
        ``{"emberfl": '{"algorithm": ..., "dataset": ..., "model": ..., "round": ...}'}``.
    """
    info = {
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "model": config.model,
        "round": round_,
    }
    return {"emberfl": json.dumps(info, sort_keys=True)}


def _toml_bytes(config: RunConfig) -> bytes:
    import tomli_w

    header = "# emberfl run configuration; reuse it with: emberfl run --config FILE\n"
    return (header + tomli_w.dumps(config_to_toml(config))).encode("utf-8")


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """Return the configuration to resume ``run_dir`` with.

    Args:
        run_dir: The run directory.
        overrides: Command-line options; only keys of
            :data:`~emberfl.cli.config.RESUME_OVERRIDABLE` may differ from ``config.toml``.

    Returns:
        The run's configuration with the overrides applied.

    Raises:
        ConfigError: If ``run_dir`` is not a run directory or an override would change the
            experiment.
    """
    saved = merge_config(RunConfig(), load_run_config(run_dir), source=str(run_dir / CONFIG_FILE))
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in RESUME_OVERRIDABLE or key == "output_dir":
            continue
        if getattr(saved, key, value) != value:
            raise ConfigError(
                f"--resume continues {run_dir} with its own {key}={getattr(saved, key)!r}; "
                f"drop the {key.replace('_', '-')} option or start a new run"
            )
    merged = merge_config(saved, {k: v for k, v in overrides.items() if k != "output_dir"})
    if saved.dp_target_epsilon is not None and merged.rounds != saved.rounds:
        raise ConfigError(
            f"{run_dir} calibrated its noise to spend epsilon {saved.dp_target_epsilon} in "
            f"{saved.rounds} rounds; running to round {merged.rounds} would change the noise "
            "(and overspend); resume without --rounds or start a new run"
        )
    merged.output_dir = str(run_dir)
    return merged
