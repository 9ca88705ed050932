"""The configuration of ``emberfl run``: :class:`RunConfig`, TOML files and validation.

A run's options come from three layers, later ones winning: the defaults below, a TOML
file (``--config FILE``, one flat table whose keys are the field names of
:class:`RunConfig`, e.g. ``num_clients = 20``; ``num-clients`` is accepted too) and the
command line. A key may be spelled once per file (``num-clients`` and ``num_clients`` in
one file is an error). The effective configuration is written to ``RUN_DIR/config.toml``,
which is itself a valid ``--config`` file and what ``emberfl run --resume RUN_DIR`` reads
back.

Example:
    >>> cfg = merge_config(RunConfig(), {"rounds": 3}, {"lr": 0.1}, source="example")
    >>> cfg.rounds, cfg.lr, cfg.dataset
    (3, 0.1, 'digits')
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emberfl.data import DATASET_NAMES, PARTITION_METHODS
from emberfl.data.datasets import LEAF_DATASETS
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.models import MODEL_NAMES
from emberfl.selection import SELECTIONS

AGGREGATOR_NAMES = (
    "mean",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "bulyan",
    "geometric-median",
    "clipped-mean",
)
"""The server's rules (``--aggregator``; :data:`emberfl.aggregation.AGGREGATORS`)."""
ATTACK_NAMES = ("none", "label-flip", "sign-flip", "gaussian", "scale")
"""Simulated attacks (``--attack``; :mod:`emberfl.attacks`)."""
COMPRESSION_NAMES = ("none", "topk", "randk", "qsgd", "sign")
"""Uplink compression (``--compression``; :mod:`emberfl.compression`)."""
DP_MODES = ("none", "central", "local")
"""Differential privacy (``--dp``; :mod:`emberfl.privacy`)."""
_KRUM_FAMILY = {"krum": 2, "multi-krum": 2, "bulyan": 4}  # needs m >= factor * f + 3

if TYPE_CHECKING:
    from emberfl.aggregation import Aggregator
    from emberfl.algorithms import Algorithm
    from emberfl.asynchronous import ClientClock, FedAsync, FedBuff
    from emberfl.attacks import Attack
    from emberfl.compression import Compressor

__all__ = [
    "AGGREGATOR_NAMES",
    "ALGORITHMS",
    "ATTACK_NAMES",
    "COMPRESSION_NAMES",
    "DP_MODES",
    "DEFAULT_CLIENT_TIMEOUT",
    "MODES",
    "NATURAL_DATASETS",
    "PARTITIONS",
    "PARTITION_OPTIONS",
    "RESUME_OVERRIDABLE",
    "ALGORITHM_OPTIONS",
    "ASYNC_ALGORITHMS",
    "STALENESS_NAMES",
    "RunConfig",
    "build_aggregator",
    "build_algorithm",
    "build_async",
    "build_attack",
    "build_compressor",
    "check_keys",
    "config_to_toml",
    "load_config_file",
    "merge_config",
    "parse_client_speed",
    "parse_client_timeout",
    "partition_options",
    "resolve_device",
    "unreadable_reason",
]


def _algorithm_names() -> tuple[str, ...]:
    from emberfl.algorithms import ALGORITHMS as TABLE

    return tuple(TABLE)


ASYNC_ALGORITHMS: tuple[str, ...] = ("fedasync", "fedbuff")
"""The asynchronous algorithms (:mod:`emberfl.asynchronous`): clients report on a virtual
clock, and a "round" of the run is one server update."""
ALGORITHMS: tuple[str, ...] = _algorithm_names() + ASYNC_ALGORITHMS
"""The algorithms ``emberfl run`` can run (:data:`emberfl.algorithms.ALGORITHMS` and
:data:`ASYNC_ALGORITHMS`)."""
STALENESS_NAMES = ("constant", "polynomial", "hinge")
"""FedAsync's staleness functions (``--staleness``)."""

MODES: tuple[str, ...] = ("serial", "thread", "process", "vectorized")
"""The execution modes: one client after another, a thread pool, worker processes, or
``chunk_size`` clients at once as one stacked model (``vectorized``: equal to the others up
to float rounding, about 1e-6 relative, not bitwise)."""

PARTITIONS: tuple[str, ...] = (*PARTITION_METHODS, "natural", "feature-noise")
"""The partitions ``emberfl run`` takes: the label-based methods of
:func:`emberfl.data.partition`, and ``natural`` (the clients a data set comes with)."""
NATURAL_DATASETS = ("synthetic", "fcube", *LEAF_DATASETS)
"""The data sets that come split by client (``--partition natural``): LEAF's give one
client per user (the first ``num_clients`` users) and each client its own test samples."""

PARTITION_OPTIONS: dict[str, dict[str, float | int | None]] = {
    "iid": {},
    "iid-lognormal": {"sigma": 0.5, "min_size": None},
    "iid-dirichlet": {"alpha": 0.5, "min_size": None},
    "dirichlet": {"alpha": 0.5, "min_size": None},
    "shards": {"shards_per_client": 2},
    "label-quantity": {"classes_per_client": 2},
    "client-dirichlet": {"alpha": 0.5},
    "natural": {},
    "feature-noise": {"noise": 0.1},
}
"""Each partition method's options and their defaults (``None``: chosen from the data,
see :func:`partition_options`)."""

ALGORITHM_OPTIONS: dict[str, dict[str, str]] = {
    "fedavg": {"server_lr": "server_lr"},
    "fedavgm": {"server_lr": "server_lr", "server_momentum": "server_momentum"},
    "fedadagrad": {"server_lr": "server_lr", "server_betas": "betas", "server_tau": "tau"},
    "fedadam": {"server_lr": "server_lr", "server_betas": "betas", "server_tau": "tau"},
    "fedyogi": {"server_lr": "server_lr", "server_betas": "betas", "server_tau": "tau"},
    "fedprox": {"server_lr": "server_lr", "prox_mu": "mu"},
    "scaffold": {"server_lr": "server_lr"},
    "feddyn": {"feddyn_alpha": "alpha"},
    "fednova": {"server_lr": "server_lr"},
    "qffl": {"qffl_q": "q"},
    "ditto": {"server_lr": "server_lr", "ditto_lambda": "lam"},
    "fedbn": {"server_lr": "server_lr"},
    "ifca": {"server_lr": "server_lr", "ifca_clusters": "clusters"},
    "perfedavg": {"server_lr": "server_lr", "perfedavg_alpha": "alpha"},
    "fedasync": {
        "fedasync_alpha": "alpha",
        "staleness": "staleness",
        "staleness_a": "a",
        "staleness_b": "b",
        "concurrency": "concurrency",
        "client_speed": "client_speed",
    },
    "fedbuff": {
        "server_lr": "server_lr",
        "buffer_size": "buffer_size",
        "concurrency": "concurrency",
        "client_speed": "client_speed",
    },
}
"""Each algorithm's own options (config key -> the algorithm's keyword); ``lr``,
``epochs``, ``momentum``, ``weight_decay``, ``optimizer`` (with ``adam_betas`` and
``adam_eps``) and ``stragglers`` apply to every algorithm. An option another
algorithm owns is an error, not silently ignored."""

_ALL_ALGORITHM_KEYS = (
    "server_lr",
    "server_momentum",
    "server_betas",
    "server_tau",
    "prox_mu",
    "feddyn_alpha",
    "qffl_q",
    "ditto_lambda",
    "ifca_clusters",
    "perfedavg_alpha",
    "fedasync_alpha",
    "staleness",
    "staleness_a",
    "staleness_b",
    "buffer_size",
    "concurrency",
    "client_speed",
)

RESUME_OVERRIDABLE: frozenset[str] = frozenset(
    {
        "rounds",
        "mode",
        "parallelism",
        "chunk_size",
        "device",
        "checkpoint_every",
        "client_timeout",
        "rank_timeout",
        "quiet",
        "logger",
    }
)
"""Keys that ``emberfl run --resume`` may change: they do not alter the rounds already run
(results are bitwise identical across serial, thread and process modes and any
parallelism; ``rounds`` extends a run). Changes that would alter the bits (to or from
vectorized mode, another chunk split in vectorized mode, CPU to CUDA) are refused when the
run is resumed."""

DEFAULT_CLIENT_TIMEOUT = 600.0
"""Seconds a client may train in an ``emberfl run`` unless ``client_timeout`` says
otherwise."""

_NOT_SAVED = frozenset({"output_dir", "quiet"})


@dataclass
class RunConfig:
    """Everything that defines an ``emberfl run`` experiment.

    The defaults are the "no options" run: FedAvg on the UCI digits data set (offline),
    split across 10 clients with Dirichlet(0.5) label skew; it reaches about 94% test
    accuracy in 20 rounds and well under a minute on two CPU cores.

    Attributes:
        output_dir: The run directory (``None``: ``runs/<dataset>-<algorithm>-<time>``).
        algorithm: One of :data:`ALGORITHMS`.
        model: One of :data:`emberfl.models.MODEL_NAMES`.
        dataset: One of :data:`emberfl.data.DATASET_NAMES`.
        data_root: Folder of the on-disk data sets (``cifar10``, ``mnist``, ...).
        partition: One of :data:`PARTITIONS`: :data:`emberfl.data.PARTITION_METHODS`, or
            ``natural`` for a data set that comes split by client (``synthetic``).
        alpha: Dirichlet concentration (``dirichlet``, ``iid-dirichlet``,
            ``client-dirichlet``; default 0.5).
        sigma: Lognormal shape of client sizes (``iid-lognormal``; default 0.5).
        shards_per_client: Shards per client (``shards``; default 2).
        classes_per_client: Classes per client (``label-quantity``; default 2).
        min_size: Smallest client size (``dirichlet``, ``iid-dirichlet``,
            ``iid-lognormal``; default ``min(10, train size // (4 * num_clients))``).
        noise: ``feature-noise``'s level: client ``k`` of ``N`` gets Gaussian noise of
            standard deviation ``noise * (k + 1) / N`` on its training inputs (default 0.1).
        augment: Random crop and horizontal flip of every client training batch from the
            client's stream (:class:`emberfl.data.skew.CropFlip`; ``None``: on for
            ``cifar10`` and ``cifar100``, off otherwise).
        train_size: Use this many training samples (``None``: all of them), for quick
            runs: drawn without replacement from the seed's stream before partitioning, or,
            for ``synthetic-cifar10``, generated at that size.
        hidden_sizes: The MLP's hidden widths (``None``: 200, 200); ``mlp`` only.
        logger: Experiment trackers that also log the run (:data:`emberfl.cli.trackers.LOGGERS`:
            ``tensorboard``, ``wandb``, ``mlflow``); ``None``: none.
        synthetic_alpha: ``synthetic``'s ``alpha``, the spread of the clients' labelling
            rules (``None``: 1).
        synthetic_beta: ``synthetic``'s ``beta``, the spread of their feature means
            (``None``: 1).
        num_clients: Clients in the federation.
        rounds: Communication rounds.
        sample_ratio: Fraction of clients that train in each round, in ``(0, 1]``.
        epochs: Local epochs per round.
        batch_size: Local batch size.
        lr: Local SGD learning rate.
        optimizer: The local optimiser, ``sgd`` or ``adam`` (every algorithm whose equations
            do not assume SGD steps; ``fednova``, ``scaffold`` and ``qffl`` take ``sgd``).
        momentum: Local SGD momentum (every algorithm).
        weight_decay: Local SGD weight decay (every algorithm).
        adam_betas: Adam's moment decays ``[beta1, beta2]`` (``optimizer = "adam"`` only;
            ``None``: 0.9, 0.999).
        adam_eps: Adam's epsilon (``optimizer = "adam"`` only; ``None``: 1e-8).
        stragglers: Fraction of clients that, in each round, run a number of epochs drawn
            uniformly from ``1..epochs`` instead of ``epochs`` (systems heterogeneity as in
            FedProx's experiments; every algorithm; 0: none).
        drop_stragglers: Leave the clients that would not finish ``epochs`` out of the
            round instead of using their partial work (needs ``stragglers > 0``).
        server_lr: The server learning rate ``eta_g`` (``None``: the algorithm's default;
            every algorithm but ``feddyn``).
        server_momentum: FedAvgM's server momentum ``beta``.
        server_betas: FedOpt's moment decays ``[beta1, beta2]`` (``fedadagrad``: ``[beta1]``).
        server_tau: FedOpt's adaptivity ``tau``.
        prox_mu: FedProx's proximal coefficient ``mu``.
        feddyn_alpha: FedDyn's regularisation coefficient ``alpha``.
        qffl_q: q-FFL's fairness exponent ``q``.
        ditto_lambda: Ditto's ``lambda``, pulling personal models towards the global one.
        ifca_clusters: IFCA's number of cluster models ``k``.
        perfedavg_alpha: Per-FedAvg's inner (adaptation) step size ``alpha``.
        fedasync_alpha: FedAsync's mixing weight ``alpha`` in ``(0, 1]`` (``None``: 0.6).
        staleness: FedAsync's staleness function (:data:`STALENESS_NAMES`; ``None``:
            ``polynomial``).
        staleness_a: Its decay ``a`` (``polynomial``, ``hinge``; ``None``: 0.5 and 10).
        staleness_b: The hinge's threshold ``b`` (``hinge``; ``None``: 4).
        buffer_size: FedBuff's ``K``, reports per server update (``None``:
            ``min(10, concurrency)``).
        concurrency: ``fedasync``'s and ``fedbuff``'s clients in flight (``None``: the
            clients per round, ``num_clients * sample_ratio``).
        client_speed: The clients' virtual seconds per task, ``"lognormal:MU,SIGMA"``
            (client ``k`` takes ``exp(MU + SIGMA z_k)``, ``z_k`` from its own stream;
            ``None``: ``lognormal:0,1``).
        client_test_fraction: The fraction of each client's data held out as its own test
            split, in ``[0, 1)`` (``None``: 0.2 for personalised algorithms, ``ditto``,
            ``fedbn``, ``ifca`` and ``perfedavg``, else 0). With it, each round also logs
            ``client_test_accuracy`` (the global model on the clients' own tests) and,
            for personalised algorithms, ``personal_test_accuracy`` (each client's own
            model on its test).
        aggregator: The server's rule for the main stream (:data:`AGGREGATOR_NAMES`;
            every rule but ``mean`` keeps all of a round's updates).
        trim_ratio: ``trimmed-mean``'s fraction trimmed at each end (``None``: 0.1).
        byzantine_f: ``krum``'s, ``multi-krum``'s and ``bulyan``'s ``f``, the Byzantine
            clients per round they tolerate (``None``: the expected malicious clients
            per round, ``round(malicious_fraction * clients per round)``, or 0).
        clip_norm: ``clipped-mean``'s bound on each update's L2 norm (required there).
        attack: Simulated Byzantine clients (:data:`ATTACK_NAMES`, :mod:`emberfl.attacks`).
        malicious_fraction: The fraction of the federation that is malicious, a set fixed
            for the run (required with an attack).
        attack_scale: The factor of ``sign-flip`` (which sends ``-S * delta``; ``None``: 4)
            and ``scale`` (``S * delta``; ``None``: 10).
        attack_std: The ``gaussian`` attack's standard deviation (``None``: 1).
        dp: ``"central"``: client-level differential privacy (DP-FedAvg,
            :mod:`emberfl.privacy`: Poisson sampling of rate ``sample_ratio``, each update
            clipped to ``dp_clip_norm``, Gaussian noise, a fixed denominator), with the
            privacy spent logged each round as ``dp_epsilon``; ``"local"``: record-level
            DP-SGD on every client (:class:`emberfl.privacy.DPSGD`: each sample's
            gradient clipped to ``dp_clip_norm``, Gaussian noise each step), with the
            worst-off client's ``epsilon`` logged each round; ``"none"`` (default).
        dp_noise_multiplier: DP-FedAvg's or DP-SGD's ``sigma`` (``None``: 1.0).
        dp_clip_norm: DP-FedAvg's clipping bound ``C`` on each update, or DP-SGD's on each
            sample's gradient (``None``: 1.0).
        dp_delta: The ``delta`` at which ``epsilon`` is reported (``None``: 1e-5).
        dp_adaptive_clip_quantile: Adaptive clipping's target quantile (Andrew et al.,
            2021; ``None``: a fixed bound ``dp_clip_norm``, which is the initial bound
            otherwise); the bound is logged each round as ``dp_clip_norm``.
        dp_target_epsilon: ``dp = "central"``: choose the smallest noise multiplier that
            spends at most this ``epsilon`` at ``dp_delta`` after ``rounds`` rounds
            (instead of ``dp_noise_multiplier``; a resume cannot then change ``rounds``).
        compression: The uplink's encoding (:data:`COMPRESSION_NAMES`,
            :mod:`emberfl.compression`): ``topk``, ``randk``, ``qsgd``, ``sign``, or ``none``.
        compression_ratio: ``topk``'s and ``randk``'s fraction of entries sent (``None``:
            0.01).
        qsgd_levels: ``qsgd``'s levels ``s`` (``None``: 16).
        error_feedback: Whether compressing clients keep what their payload left out and
            send it later (default; ``--no-error-feedback`` turns it off).
        client_selection: How a round's clients are chosen (:mod:`emberfl.selection`:
            ``uniform``, ``size``, ``power-of-choice``).
        poc_candidates: Power-of-choice's candidates per round (``None``: twice the
            clients per round, at most all clients).
        mode: One of :data:`MODES`; results are bitwise identical in every mode.
        parallelism: Threads or worker processes (0: one per CPU core, at most one per
            client of a round); ignored in serial mode.
        chunk_size: Clients trained at once in vectorized mode (``None``: the trainer's
            default).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: The experiment seed (partition, client sampling, model init, shuffling).
        checkpoint_every: Save a checkpoint every this many rounds (0: only at the end).
        client_timeout: Seconds a client may train before the run stops with a
            :class:`~emberfl.errors.ClientTimeoutError` (0: no limit; ``"off"`` in a TOML
            file or on the command line means 0). It does not change any result, so a
            resumed run may change it.
        rank_timeout: Under ``torchrun``: seconds a rank may go without a heartbeat before
            the others stop with an error naming it (a hung or lost rank).
        quiet: No progress bars or tables; print only the run directory.
    """

    output_dir: str | None = None
    algorithm: str = "fedavg"
    model: str = "mlp"
    dataset: str = "digits"
    data_root: str | None = None
    partition: str = "dirichlet"
    alpha: float | None = None
    sigma: float | None = None
    shards_per_client: int | None = None
    classes_per_client: int | None = None
    min_size: int | None = None
    noise: float | None = None
    augment: bool | None = None
    train_size: int | None = None
    hidden_sizes: list[int] | None = None
    logger: list[str] | None = None
    synthetic_alpha: float | None = None
    synthetic_beta: float | None = None
    num_clients: int = 10
    rounds: int = 20
    sample_ratio: float = 1.0
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.2
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] | None = None
    adam_eps: float | None = None
    stragglers: float = 0.0
    drop_stragglers: bool = False
    server_lr: float | None = None
    server_momentum: float | None = None
    server_betas: list[float] | None = None
    server_tau: float | None = None
    prox_mu: float | None = None
    feddyn_alpha: float | None = None
    qffl_q: float | None = None
    ditto_lambda: float | None = None
    ifca_clusters: int | None = None
    perfedavg_alpha: float | None = None
    fedasync_alpha: float | None = None
    staleness: str | None = None
    staleness_a: float | None = None
    staleness_b: float | None = None
    buffer_size: int | None = None
    concurrency: int | None = None
    client_speed: str | None = None
    client_test_fraction: float | None = None
    aggregator: str = "mean"
    trim_ratio: float | None = None
    byzantine_f: int | None = None
    clip_norm: float | None = None
    attack: str = "none"
    malicious_fraction: float | None = None
    attack_scale: float | None = None
    attack_std: float | None = None
    dp: str = "none"
    dp_noise_multiplier: float | None = None
    dp_clip_norm: float | None = None
    dp_delta: float | None = None
    dp_adaptive_clip_quantile: float | None = None
    dp_target_epsilon: float | None = None
    compression: str = "none"
    compression_ratio: float | None = None
    qsgd_levels: int | None = None
    error_feedback: bool = True
    client_selection: str = "uniform"
    poc_candidates: int | None = None
    mode: str = "serial"
    parallelism: int = 0
    chunk_size: int | None = None
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 5
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    rank_timeout: float = 30.0
    quiet: bool = False

    def validate(self) -> None:
        """Check every value that can be checked without loading data.

        Raises:
            ConfigError: Naming the offending key, its value and what is allowed.
        """
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("model", self.model, MODEL_NAMES)
        _check_choice("dataset", self.dataset, DATASET_NAMES)
        _check_choice("partition", self.partition, PARTITIONS)
        self._validate_natural()
        _check_choice("mode", self.mode, MODES)
        for key in ("num_clients", "rounds", "epochs", "batch_size"):
            _check_at_least(key, getattr(self, key), 1)
        for key in ("parallelism", "checkpoint_every", "seed"):
            _check_at_least(key, getattr(self, key), 0)
        if self.output_dir is not None and not self.output_dir.strip():
            raise ConfigError("output_dir must name a folder, got an empty string")
        if not (
            math.isfinite(self.client_timeout) and 0 <= self.client_timeout <= threading.TIMEOUT_MAX
        ):
            raise ConfigError(
                f'client_timeout must be a number of seconds >= 0 (0 or "off": no limit), '
                f"got {self.client_timeout}"
            )
        if not (math.isfinite(self.rank_timeout) and 1 <= self.rank_timeout <= 86_400):
            raise ConfigError(
                f"rank_timeout must be a number of seconds in [1, 86400], got {self.rank_timeout}"
            )
        if self.seed >= 1 << 64:
            raise ConfigError(f"seed must fit in 64 bits (0 <= seed < 2**64), got {self.seed}")
        if not (math.isfinite(self.sample_ratio) and 0 < self.sample_ratio <= 1):
            raise ConfigError(f"sample_ratio must be in (0, 1], got {self.sample_ratio}")
        if int(self.num_clients * self.sample_ratio) < 1:
            raise ConfigError(
                f"sample_ratio={self.sample_ratio} selects no client out of "
                f"num_clients={self.num_clients}; raise sample_ratio or num_clients"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        resolve_device(self.device)
        owned = ALGORITHM_OPTIONS.get(self.algorithm, {})
        for key in _ALL_ALGORITHM_KEYS:
            if getattr(self, key) is not None and key not in owned:
                users = [name for name, keys in ALGORITHM_OPTIONS.items() if key in keys]
                raise ConfigError(
                    f"algorithm {self.algorithm!r} does not use {key} (set to "
                    f"{getattr(self, key)}); it is an option of {', '.join(users)}. "
                    f"{self.algorithm}'s own options: {', '.join(owned) or 'none'}"
                )
        if self.server_betas is not None and (
            not self.server_betas
            or len(self.server_betas) > 2
            or any(isinstance(b, bool) or not isinstance(b, int | float) for b in self.server_betas)
        ):
            raise ConfigError(
                f"server_betas must be one or two numbers (beta1[, beta2]), got "
                f"{self.server_betas!r}"
            )
        for key in ("adam_betas", "adam_eps"):
            if getattr(self, key) is not None and self.optimizer != "adam":
                raise ConfigError(
                    f"{key} (set to {getattr(self, key)}) is an option of optimizer 'adam', "
                    f"not {self.optimizer!r}"
                )
        if self.adam_betas is not None and (
            len(self.adam_betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, int | float) for b in self.adam_betas)
        ):
            raise ConfigError(
                f"adam_betas must be two numbers (beta1, beta2), got {self.adam_betas!r}"
            )
        if not (math.isfinite(self.stragglers) and 0 <= self.stragglers <= 1):
            raise ConfigError(f"stragglers must be a fraction in [0, 1], got {self.stragglers}")
        algorithm = build_algorithm(self)  # the algorithm checks its own values
        if self.is_async():
            self._validate_async()
        if self.mode == "vectorized" and not algorithm.vectorizable:
            raise ConfigError(
                f"algorithm {self.algorithm!r} cannot run in vectorized mode (see its "
                "documentation); use mode serial, thread or process"
            )
        fraction = self.test_fraction()
        if not (math.isfinite(fraction) and 0 <= fraction < 1):
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {fraction}")
        if algorithm.personalised and fraction == 0:
            raise ConfigError(
                f"algorithm {self.algorithm!r} is judged on each client's own test split: "
                "client_test_fraction must be > 0 (its default is 0.2)"
            )
        _check_choice("client_selection", self.client_selection, SELECTIONS)
        self._validate_robustness()
        if self.poc_candidates is not None:
            if self.client_selection != "power-of-choice":
                raise ConfigError(
                    f"poc_candidates (set to {self.poc_candidates}) is an option of "
                    f"client_selection 'power-of-choice', not {self.client_selection!r}"
                )
            per_round = self.clients_per_round()
            if not per_round <= self.poc_candidates <= self.num_clients:
                raise ConfigError(
                    f"poc_candidates must be in {per_round}..{self.num_clients} (the clients "
                    f"per round..all clients), got {self.poc_candidates}"
                )
        allowed = PARTITION_OPTIONS[self.partition]
        for key in _ALL_PARTITION_KEYS:
            if getattr(self, key) is not None and key not in allowed:
                listed = ", ".join(allowed) or "none"
                raise ConfigError(
                    f"partition {self.partition!r} does not use {key} (set to "
                    f"{getattr(self, key)}); its options are: {listed}"
                )
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"alpha must be a positive number, got {self.alpha} (0.1 is strong skew, "
                "100 nearly IID)"
            )
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        for key in ("shards_per_client", "classes_per_client"):
            if getattr(self, key) is not None:
                _check_at_least(key, getattr(self, key), 1)
        if self.min_size is not None:
            _check_at_least("min_size", self.min_size, 0)
        if self.noise is not None and not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"noise must be a number >= 0, got {self.noise}")
        not_images = ("digits", "synthetic", "fcube", "shakespeare", "sent140", "reddit")
        if self.augment and self.dataset in (*not_images, "synthetic-leaf"):
            raise ConfigError(
                f"augment crops and flips images; data set {self.dataset!r} is not one "
                "(8x8 digits, vectors or token ids)"
            )
        if self.chunk_size is not None:
            _check_at_least("chunk_size", self.chunk_size, 1)
        if self.train_size is not None:
            _check_at_least("train_size", self.train_size, 1)
        if self.logger is not None:
            from emberfl.cli.trackers import LOGGERS

            for name in self.logger:
                if not isinstance(name, str):
                    raise ConfigError(f"logger must list tracker names, got {name!r}")
                _check_choice("logger", name, LOGGERS)
            if len(set(self.logger)) != len(self.logger):
                raise ConfigError(f"logger names a tracker twice: {self.logger}")
        if self.hidden_sizes is not None:
            if not self.hidden_sizes or any(
                isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.hidden_sizes
            ):
                raise ConfigError(
                    f"hidden_sizes must be one or more positive integers, got {self.hidden_sizes!r}"
                )
            if self.model != "mlp":
                raise ConfigError(
                    f"hidden_sizes sets the widths of model 'mlp'; model {self.model!r} does not "
                    "use it"
                )

    def _validate_natural(self) -> None:
        natural = self.dataset in NATURAL_DATASETS
        if self.dataset == "fcube" and self.partition == "natural" and self.num_clients != 4:
            raise ConfigError(
                f"fcube's natural split has 4 clients (octant pairs), got num_clients="
                f"{self.num_clients}; pass --num-clients 4 or another --partition"
            )
        if self.dataset == "synthetic" and self.partition != "natural":
            raise ConfigError(
                f"data set {self.dataset!r} comes split by client (each client its own "
                "distribution): use --partition natural"
            )
        if self.dataset in LEAF_DATASETS and self.partition == "natural":
            if self.train_size is not None:
                raise ConfigError(
                    "train_size subsamples a pooled data set; LEAF's natural split keeps each "
                    "user's samples: drop --train-size (--num-clients picks the first users)"
                )
            if self.client_test_fraction:
                raise ConfigError(
                    f"{self.dataset}'s users come with test samples of their own: drop "
                    "--client-test-fraction"
                )
        if self.partition == "natural" and not natural:
            raise ConfigError(
                f"partition 'natural' takes the clients a data set comes with; "
                f"{self.dataset!r} has none (natural: {', '.join(NATURAL_DATASETS)})"
            )
        for key in ("synthetic_alpha", "synthetic_beta"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.dataset != "synthetic":
                raise ConfigError(
                    f"{key} (set to {value}) is an option of data set 'synthetic', not "
                    f"{self.dataset!r}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a number >= 0, got {value}")
        if self.dataset == "synthetic" and self.train_size is not None:
            raise ConfigError(
                "train_size subsamples a pooled data set; 'synthetic' is generated per client "
                "(its sizes come from the seed): drop --train-size"
            )

    def augments(self) -> bool:
        """Whether client batches are augmented (``augment`` with its default)."""
        if self.augment is not None:
            return bool(self.augment)
        return self.dataset in ("cifar10", "cifar100")

    def is_async(self) -> bool:
        """Whether the algorithm is asynchronous (:data:`ASYNC_ALGORITHMS`)."""
        return self.algorithm in ASYNC_ALGORITHMS

    def _validate_async(self) -> None:
        plain = {
            "aggregator": "mean",
            "attack": "none",
            "dp": "none",
            "compression": "none",
            "client_selection": "uniform",
        }
        for key, value in plain.items():
            if getattr(self, key) != value:
                raise ConfigError(
                    f"algorithm {self.algorithm!r} is asynchronous: the server folds in one "
                    f"report at a time, so {key} {getattr(self, key)!r} does not apply (it "
                    f"needs a round's updates together); leave {key} at {value!r}"
                )
        if self.drop_stragglers:
            raise ConfigError(
                f"algorithm {self.algorithm!r} is asynchronous: slow clients report late "
                "instead of being dropped, so drop_stragglers does not apply"
            )
        concurrency = self.async_concurrency()
        if not 1 <= concurrency <= self.num_clients:
            raise ConfigError(
                f"concurrency must be in 1..{self.num_clients} (num_clients), got {concurrency}"
            )
        if self.staleness is not None:
            _check_choice("staleness", self.staleness, STALENESS_NAMES)
        kind = self.staleness or "polynomial"
        if self.staleness_a is not None and kind == "constant":
            raise ConfigError(
                f"staleness_a (set to {self.staleness_a}) is an option of staleness "
                "'polynomial' or 'hinge', not 'constant'"
            )
        if self.staleness_b is not None and kind != "hinge":
            raise ConfigError(
                f"staleness_b (set to {self.staleness_b}) is an option of staleness 'hinge', "
                f"not {kind!r}"
            )
        for key in ("staleness_a", "staleness_b"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a number >= 0, got {value}")
        if self.fedasync_alpha is not None and not (
            math.isfinite(self.fedasync_alpha) and 0 < self.fedasync_alpha <= 1
        ):
            raise ConfigError(f"fedasync_alpha must be in (0, 1], got {self.fedasync_alpha}")
        if self.buffer_size is not None:
            _check_at_least("buffer_size", self.buffer_size, 1)
        build_async(self)

    def async_concurrency(self) -> int:
        """Return ``concurrency`` with its default (the clients per round) filled in."""
        return self.clients_per_round() if self.concurrency is None else int(self.concurrency)

    def _validate_robustness(self) -> None:
        _check_choice("aggregator", self.aggregator, AGGREGATOR_NAMES)
        _check_choice("attack", self.attack, ATTACK_NAMES)
        owners = {
            "trim_ratio": ("aggregator", ("trimmed-mean",)),
            "byzantine_f": ("aggregator", tuple(_KRUM_FAMILY)),
            "clip_norm": ("aggregator", ("clipped-mean",)),
            "attack_scale": ("attack", ("sign-flip", "scale")),
            "attack_std": ("attack", ("gaussian",)),
        }
        for key, (owner, names) in owners.items():
            if getattr(self, key) is not None and getattr(self, owner) not in names:
                listed = " or ".join(repr(n) for n in names)
                raise ConfigError(
                    f"{key} (set to {getattr(self, key)}) is an option of {owner} {listed}, "
                    f"not {getattr(self, owner)!r}"
                )
        if self.trim_ratio is not None and not (
            math.isfinite(self.trim_ratio) and 0 <= self.trim_ratio < 0.5
        ):
            raise ConfigError(f"trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        if self.aggregator == "clipped-mean" and self.clip_norm is None:
            raise ConfigError("aggregator 'clipped-mean' needs clip_norm (--clip-norm C)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.attack == "none":
            if self.malicious_fraction is not None:
                raise ConfigError(
                    f"malicious_fraction (set to {self.malicious_fraction}) needs an attack "
                    "(--attack label-flip, sign-flip, gaussian or scale)"
                )
        elif self.malicious_fraction is None:
            raise ConfigError(
                f"attack {self.attack!r} needs malicious clients: set malicious_fraction "
                "(--malicious-fraction F)"
            )
        else:
            from emberfl.attacks import malicious_clients

            malicious_clients(self.seed, self.num_clients, float(self.malicious_fraction))
        f = self.robust_f()
        if f < 0:
            raise ConfigError(f"byzantine_f must be >= 0, got {f}")
        factor = _KRUM_FAMILY.get(self.aggregator)
        m = self.clients_per_round()
        if factor is not None and not (m == 1 and f == 0) and m < factor * f + 3:
            raise ConfigError(
                f"aggregator {self.aggregator!r} with byzantine_f={f} needs at least "
                f"{factor}f + 3 = {factor * f + 3} clients per round, got {m}; sample more "
                f"clients per round or lower byzantine_f"
            )
        build_attack(self)
        self._validate_privacy()
        self._validate_compression()

    def _validate_compression(self) -> None:
        _check_choice("compression", self.compression, COMPRESSION_NAMES)
        if self.compression_ratio is not None and self.compression not in ("topk", "randk"):
            raise ConfigError(
                f"compression_ratio (set to {self.compression_ratio}) is an option of "
                f"compression 'topk' or 'randk', not {self.compression!r}"
            )
        if self.qsgd_levels is not None and self.compression != "qsgd":
            raise ConfigError(
                f"qsgd_levels (set to {self.qsgd_levels}) is an option of compression 'qsgd', "
                f"not {self.compression!r}"
            )
        if not self.error_feedback and self.compression == "none":
            raise ConfigError("error_feedback = false needs a compression (there is none)")
        build_compressor(self)

    def _validate_privacy(self) -> None:
        _check_choice("dp", self.dp, DP_MODES)
        keys = ("dp_noise_multiplier", "dp_clip_norm", "dp_delta")
        central = ("dp_adaptive_clip_quantile", "dp_target_epsilon")
        if self.dp == "none":
            for key in keys + central:
                if getattr(self, key) is not None:
                    owners = "'central'" if key in central else "'central' or 'local'"
                    raise ConfigError(
                        f"{key} (set to {getattr(self, key)}) is an option of dp {owners}"
                    )
            return
        if self.dp_target_epsilon is not None and self.dp_noise_multiplier is not None:
            raise ConfigError(
                f"dp_target_epsilon (set to {self.dp_target_epsilon}) chooses the noise "
                f"multiplier; drop dp_noise_multiplier (set to {self.dp_noise_multiplier})"
            )
        if self.dp == "local":
            self._validate_local_dp()
            return
        if self.aggregator != "mean":
            raise ConfigError(
                f"dp 'central' aggregates with its own noisy clipped sum; it does not combine "
                f"with aggregator {self.aggregator!r}"
            )
        if self.client_selection != "uniform":
            raise ConfigError(
                "dp 'central' samples clients by Poisson sampling (each with probability "
                f"sample_ratio), which its accounting assumes; client_selection "
                f"{self.client_selection!r} cannot be used with it"
            )
        sigma, _, delta = self._checked_dp_parameters()
        from emberfl.algorithms import ModelLayout
        from emberfl.privacy import epsilon

        probe = build_algorithm(self).uplink_streams(ModelLayout.of(_probe_model()))
        if len(probe) != 1:
            raise ConfigError(
                f"dp 'central' privatises the one update a client sends; algorithm "
                f"{self.algorithm!r} sends {len(probe)} ({', '.join(sorted(probe))})"
            )
        epsilon(sigma, self.sample_rate(), 1, delta)  # the accountant is installed
        try:
            build_aggregator(self)
        except InvalidArgumentError as exc:
            raise ConfigError(f"dp: {exc}") from None

    def _checked_dp_parameters(self) -> tuple[float, float, float]:
        """:meth:`dp_parameters`, each checked: sigma and C positive, delta in (0, 1)."""
        sigma, clip, delta = self.dp_parameters()
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"dp_noise_multiplier must be a positive number, got {sigma}")
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"dp_clip_norm must be a positive number, got {clip}")
        if not (math.isfinite(delta) and 0 < delta < 1):
            raise ConfigError(f"dp_delta must be in (0, 1), got {delta}")
        return sigma, clip, delta

    def _validate_local_dp(self) -> None:
        if self.dp_adaptive_clip_quantile is not None:
            raise ConfigError(
                f"dp_adaptive_clip_quantile (set to {self.dp_adaptive_clip_quantile}) is an "
                "option of dp 'central'; dp 'local' clips each sample's gradient to dp_clip_norm"
            )
        if self.dp_target_epsilon is not None:
            raise ConfigError(
                f"dp_target_epsilon (set to {self.dp_target_epsilon}) is an option of dp "
                "'central'; with dp 'local' each client's epsilon depends on its data size and "
                "participation, so set dp_noise_multiplier"
            )
        if self.client_selection == "power-of-choice":
            raise ConfigError(
                "dp 'local' protects what a client sends, but power-of-choice selection sends "
                "each candidate's loss on its data; use client_selection uniform or size"
            )
        sigma, _, delta = self._checked_dp_parameters()
        from emberfl.privacy import epsilon

        epsilon(sigma, 0.5, 1, delta)  # the accountant is installed

    def dp_parameters(self) -> tuple[float, float, float]:
        """Return ``(dp_noise_multiplier, dp_clip_norm, dp_delta)``, defaults filled in.

        With ``dp_target_epsilon`` the noise multiplier is the smallest that spends at most
        that ``epsilon`` after ``rounds`` rounds (:func:`emberfl.privacy.noise_for_epsilon`).
        """
        clip = 1.0 if self.dp_clip_norm is None else float(self.dp_clip_norm)
        delta = 1e-5 if self.dp_delta is None else float(self.dp_delta)
        if self.dp_target_epsilon is not None:
            from emberfl.privacy import noise_for_epsilon

            target = float(self.dp_target_epsilon)
            return noise_for_epsilon(target, self.sample_rate(), self.rounds, delta), clip, delta
        sigma = 1.0 if self.dp_noise_multiplier is None else float(self.dp_noise_multiplier)
        return sigma, clip, delta

    def sample_rate(self) -> float:
        """Return the probability ``q`` that a client is in a round (``m / N``)."""
        return self.clients_per_round() / self.num_clients

    def robust_f(self) -> int:
        """Return ``byzantine_f`` with its default filled in."""
        if self.byzantine_f is not None:
            return int(self.byzantine_f)
        if self.attack == "none" or self.malicious_fraction is None:
            return 0
        return round(float(self.malicious_fraction) * self.clients_per_round())

    def test_fraction(self) -> float:
        """Return ``client_test_fraction`` with its default filled in (0 for a LEAF data
        set's natural split, whose clients bring their own test samples)."""
        if self.dataset in LEAF_DATASETS and self.partition == "natural":
            return 0.0
        if self.client_test_fraction is not None:
            return float(self.client_test_fraction)
        from emberfl.algorithms import ALGORITHMS as TABLE

        cls = TABLE.get(self.algorithm)
        return 0.2 if cls is not None and cls.personalised else 0.0

    def timeout_seconds(self) -> float | None:
        """Return ``client_timeout`` as the executors take it (``None``: no limit)."""
        return self.client_timeout if self.client_timeout > 0 else None

    def clients_per_round(self) -> int:
        """Return how many clients train in each round."""
        return max(1, int(self.num_clients * self.sample_ratio))

    def workers(self) -> int:
        """Return the number of threads or processes to use (``parallelism`` resolved)."""
        if self.mode == "serial":
            return 1
        if self.parallelism > 0:
            return self.parallelism
        return max(1, min(os.cpu_count() or 1, self.clients_per_round()))


_ALL_PARTITION_KEYS = (
    "alpha",
    "sigma",
    "shards_per_client",
    "classes_per_client",
    "min_size",
    "noise",
)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "output_dir": (str,),
    "algorithm": (str,),
    "model": (str,),
    "dataset": (str,),
    "data_root": (str,),
    "partition": (str,),
    "alpha": (float, int),
    "sigma": (float, int),
    "shards_per_client": (int,),
    "classes_per_client": (int,),
    "min_size": (int,),
    "noise": (float, int),
    "augment": (bool,),
    "train_size": (int,),
    "hidden_sizes": (list,),
    "logger": (list,),
    "synthetic_alpha": (float, int),
    "synthetic_beta": (float, int),
    "num_clients": (int,),
    "rounds": (int,),
    "sample_ratio": (float, int),
    "epochs": (int,),
    "batch_size": (int,),
    "lr": (float, int),
    "optimizer": (str,),
    "momentum": (float, int),
    "weight_decay": (float, int),
    "adam_betas": (list,),
    "adam_eps": (float, int),
    "stragglers": (float, int),
    "drop_stragglers": (bool,),
    "server_lr": (float, int),
    "server_momentum": (float, int),
    "server_betas": (list,),
    "server_tau": (float, int),
    "prox_mu": (float, int),
    "feddyn_alpha": (float, int),
    "qffl_q": (float, int),
    "ditto_lambda": (float, int),
    "ifca_clusters": (int,),
    "perfedavg_alpha": (float, int),
    "fedasync_alpha": (float, int),
    "staleness": (str,),
    "staleness_a": (float, int),
    "staleness_b": (float, int),
    "buffer_size": (int,),
    "concurrency": (int,),
    "client_speed": (str,),
    "client_test_fraction": (float, int),
    "aggregator": (str,),
    "trim_ratio": (float, int),
    "byzantine_f": (int,),
    "clip_norm": (float, int),
    "attack": (str,),
    "malicious_fraction": (float, int),
    "attack_scale": (float, int),
    "attack_std": (float, int),
    "dp": (str,),
    "dp_noise_multiplier": (float, int),
    "dp_clip_norm": (float, int),
    "dp_delta": (float, int),
    "dp_adaptive_clip_quantile": (float, int),
    "dp_target_epsilon": (float, int),
    "compression": (str,),
    "compression_ratio": (float, int),
    "qsgd_levels": (int,),
    "error_feedback": (bool,),
    "client_selection": (str,),
    "poc_candidates": (int,),
    "mode": (str,),
    "parallelism": (int,),
    "chunk_size": (int,),
    "device": (str,),
    "seed": (int,),
    "checkpoint_every": (int,),
    "client_timeout": (float, int),
    "rank_timeout": (float, int),
    "quiet": (bool,),
}
_OPTIONAL = frozenset(
    {
        "output_dir",
        "data_root",
        "chunk_size",
        "train_size",
        "hidden_sizes",
        "logger",
        "augment",
        "synthetic_alpha",
        "synthetic_beta",
        *_ALL_PARTITION_KEYS,
        *_ALL_ALGORITHM_KEYS,
        "poc_candidates",
        "client_test_fraction",
        "adam_betas",
        "adam_eps",
        "trim_ratio",
        "byzantine_f",
        "clip_norm",
        "malicious_fraction",
        "attack_scale",
        "attack_std",
        "dp_noise_multiplier",
        "dp_clip_norm",
        "dp_delta",
        "dp_adaptive_clip_quantile",
        "dp_target_epsilon",
        "compression_ratio",
        "qsgd_levels",
    }
)
_LIST_KEYS = frozenset({"hidden_sizes", "server_betas", "adam_betas", "logger"})
_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def _check_type(key: str, value: object) -> None:
    if value is None and key in _OPTIONAL:
        return
    types = _FIELD_TYPES[key]
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{key} must be {_TYPE_WORDS[types[0]]}, got {value!r} ({type(value).__name__})"
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")


def _check_at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, got {value}")


def resolve_device(device: str) -> str:
    """Turn the ``device`` option into a PyTorch device string.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        ``cuda`` when ``auto`` and CUDA is available, else the device itself.

    Raises:
        ConfigError: For another value, or a CUDA device that is not available.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if ":" in device else 0
        if index >= count:
            raise ConfigError(
                f"device {device!r} is not available ({count} CUDA device(s) found); "
                "use --device cpu or auto"
            )
        return device
    raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def build_algorithm(config: RunConfig) -> Algorithm:
    """Return the algorithm ``config`` describes, its options passed on.

    Args:
        config: The configuration (its algorithm name already checked).

    Returns:
        The algorithm.

    Raises:
        ConfigError: A value the algorithm rejects (naming the option), or
            ``server_betas`` of the wrong length for the algorithm.
    """
    from emberfl.algorithms import ALGORITHMS as TABLE

    kwargs: dict[str, Any] = {
        "lr": config.lr,
        "epochs": config.epochs,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "optimizer": config.optimizer,
        "stragglers": float(config.stragglers),
        "drop_stragglers": config.drop_stragglers,
    }
    if config.adam_betas is not None:
        kwargs["adam_betas"] = (float(config.adam_betas[0]), float(config.adam_betas[1]))
    if config.adam_eps is not None:
        kwargs["adam_eps"] = float(config.adam_eps)
    if config.dp == "local":
        from emberfl.privacy import DPSGD

        sigma, clip, _ = config.dp_parameters()
        kwargs["dp"] = DPSGD(sigma, clip)
    if config.is_async():
        from emberfl.algorithms import FedAvg

        return FedAvg(**kwargs)  # the clients' part; the server's is build_async's
    for key, keyword in ALGORITHM_OPTIONS[config.algorithm].items():
        value = getattr(config, key)
        if value is None:
            continue
        if key == "server_betas":
            wanted = 1 if config.algorithm == "fedadagrad" else 2
            if len(value) != wanted:
                shape = (
                    "[beta1] (it keeps no decayed second moment)"
                    if wanted == 1
                    else ("[beta1, beta2]")
                )
                raise ConfigError(f"server_betas for {config.algorithm} is {shape}, got {value!r}")
            kwargs["beta1"] = float(value[0])
            if wanted == 2:
                kwargs["beta2"] = float(value[1])
        else:
            kwargs[keyword] = value
    cls = TABLE[config.algorithm]
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = config.seed  # e.g. IFCA's initial clusters
    try:
        algorithm: Algorithm = cls(**kwargs)
    except ConfigError as exc:
        # Name the option as the user wrote it, not the algorithm's keyword.
        text = str(exc)
        for key, keyword in ALGORITHM_OPTIONS[config.algorithm].items():
            if text.startswith(f"{keyword} "):
                text = key + text[len(keyword) :]
        for keyword in ("beta1", "beta2"):
            if text.startswith(f"{keyword} "):
                text = f"server_betas' {text}"
        raise ConfigError(text) from None
    compressor = build_compressor(config)
    if compressor is not None:
        from emberfl.algorithms import Compressed

        algorithm = Compressed(algorithm, compressor, error_feedback=config.error_feedback)
    return algorithm


def parse_client_speed(text: str) -> tuple[float, float]:
    """Parse ``lognormal:MU,SIGMA`` into ``(MU, SIGMA)``.

    Raises:
        ConfigError: For another form, a non-finite ``MU`` or a negative ``SIGMA``.
    """
    kind, _, rest = text.partition(":")
    parts = rest.split(",")
    try:
        if kind.strip() != "lognormal" or len(parts) != 2:
            raise ValueError(text)
        mu, sigma = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"client_speed must be lognormal:MU,SIGMA (e.g. lognormal:0,1), got {text!r}"
        ) from None
    if not (math.isfinite(mu) and math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(
            f"client_speed lognormal:MU,SIGMA needs a finite MU and SIGMA >= 0, got {text!r}"
        )
    return mu, sigma


def build_async(config: RunConfig) -> tuple[FedAsync | FedBuff, ClientClock, int]:
    """Return the asynchronous server rule, the clients' clock and the concurrency.

    Args:
        config: A configuration of an algorithm of :data:`ASYNC_ALGORITHMS`.

    Returns:
        ``(FedAsync or FedBuff, ClientClock, concurrency)``, defaults filled in.

    Raises:
        ConfigError: A malformed ``client_speed``.
    """
    from emberfl.asynchronous import ClientClock, FedAsync, FedBuff

    mu, sigma = parse_client_speed(config.client_speed or "lognormal:0,1")
    concurrency = config.async_concurrency()
    server: FedAsync | FedBuff
    if config.algorithm == "fedasync":
        kind = config.staleness or "polynomial"
        default_a = 10.0 if kind == "hinge" else 0.5
        server = FedAsync(
            alpha=0.6 if config.fedasync_alpha is None else float(config.fedasync_alpha),
            staleness=kind,  # type: ignore[arg-type]
            a=default_a if config.staleness_a is None else float(config.staleness_a),
            b=4.0 if config.staleness_b is None else float(config.staleness_b),
        )
    else:
        size = min(10, concurrency) if config.buffer_size is None else int(config.buffer_size)
        lr = 1.0 if config.server_lr is None else float(config.server_lr)
        server = FedBuff(buffer_size=size, server_lr=lr)
    return server, ClientClock(mu=mu, sigma=sigma), concurrency


def build_compressor(config: RunConfig) -> Compressor | None:
    """Return the uplink compressor ``config`` describes (``None``: no compression).

    Args:
        config: The configuration.

    Returns:
        The compressor.

    Raises:
        ConfigError: A ratio or level count out of range.
    """
    from emberfl.compression import QSGD, RandomK, ScaledSign, TopK

    ratio = 0.01 if config.compression_ratio is None else float(config.compression_ratio)
    if config.compression == "topk":
        return TopK(ratio)
    if config.compression == "randk":
        return RandomK(ratio)
    if config.compression == "qsgd":
        return QSGD(16 if config.qsgd_levels is None else config.qsgd_levels)
    if config.compression == "sign":
        return ScaledSign()
    return None


def _probe_model() -> Any:
    import torch

    return torch.nn.Linear(2, 2)


def build_aggregator(config: RunConfig) -> Aggregator:
    """Return the server's rule ``config`` describes.

    Args:
        config: A validated configuration.

    Returns:
        The aggregator.
    """
    from emberfl.aggregation import AGGREGATORS

    if config.dp == "central":
        from emberfl.privacy import DPMean

        sigma, clip, _ = config.dp_parameters()
        quantile = config.dp_adaptive_clip_quantile
        return DPMean(
            noise_multiplier=sigma,
            clip_norm=clip,
            expected_clients=float(config.clients_per_round()),
            seed=config.seed,
            target_quantile=None if quantile is None else float(quantile),
        )
    cls = AGGREGATORS[config.aggregator]
    if config.aggregator == "trimmed-mean":
        ratio = config.trim_ratio
        return cls(0.1 if ratio is None else float(ratio))  # type: ignore[call-arg]
    if config.aggregator in _KRUM_FAMILY:
        return cls(config.robust_f())  # type: ignore[call-arg]
    if config.aggregator == "clipped-mean":
        return cls(float(config.clip_norm or 0.0))  # type: ignore[call-arg]
    return cls()


def build_attack(config: RunConfig) -> Attack | None:
    """Return the update attack ``config`` describes (``None``: none, or a data attack).

    Args:
        config: The configuration.

    Returns:
        The attack the simulation applies to what malicious clients send.
    """
    from emberfl.attacks import UPDATE_ATTACKS, Attack, malicious_clients

    if config.attack not in UPDATE_ATTACKS or config.malicious_fraction is None:
        return None
    bad = malicious_clients(config.seed, config.num_clients, float(config.malicious_fraction))
    return Attack(
        config.attack,
        bad,
        seed=config.seed,
        scale=None if config.attack_scale is None else float(config.attack_scale),
        std=1.0 if config.attack_std is None else float(config.attack_std),
    )


def partition_options(config: RunConfig, num_samples: int) -> dict[str, float | int]:
    """Return the keyword options for :func:`emberfl.data.partition`, defaults filled in.

    ``min_size`` defaults to ``min(10, num_samples // (4 * num_clients))`` (at least 1), so
    the default Dirichlet split works from the 1437 digits to CIFAR's 50,000 samples.

    Args:
        config: A validated configuration.
        num_samples: The size of the training split.

    Returns:
        The options of ``config.partition``.
    """
    options: dict[str, float | int] = {}
    for key, default in PARTITION_OPTIONS[config.partition].items():
        value = getattr(config, key)
        if value is None:
            value = default
        if value is None:  # min_size: depends on the data
            value = max(1, min(10, num_samples // (4 * config.num_clients)))
        options[key] = value
    return options


def check_keys(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Return ``values`` with ``-`` in keys turned into ``_``, checking every key.

    Args:
        values: A ``{key: value}`` layer (a TOML table, command-line options).
        source: How to name the layer in error messages (e.g. the file name).

    Returns:
        The normalised layer.

    Raises:
        ConfigError: For an unknown key (with the closest valid one), two spellings of
            one key (``num-clients`` and ``num_clients``), or a table or array value.
    """
    names = [f.name for f in dataclasses.fields(RunConfig)]
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in spelled:
            raise ConfigError(
                f"{source}: keys {spelled[key]!r} and {raw_key!r} both set {key}; keep one"
            )
        spelled[key] = raw_key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key {raw_key!r}{hint}; valid keys: {', '.join(names)}"
            )
        if isinstance(value, dict) or (isinstance(value, list) and key not in _LIST_KEYS):
            kind = "a table" if isinstance(value, dict) else "an array"
            raise ConfigError(f"{source}: key {raw_key!r} must be a single value, not {kind}")
        out[key] = value
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into a ``{key: value}`` dict (keys not yet checked).

    Args:
        path: The file.

    Returns:
        The file's top-level table.

    Raises:
        ConfigError: If the file is missing, unreadable or not valid TOML.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is {unreadable_reason(exc)}; save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None


def parse_client_timeout(text: str) -> float:
    """Parse a ``client_timeout`` given as text: ``600``, ``1.5``, ``0`` or ``off``.

    Args:
        text: The value.

    Returns:
        Seconds; 0 for no limit (``0`` or ``off``).

    Raises:
        ConfigError: For anything else, or a negative or non-finite number.

    Example:
        >>> parse_client_timeout("off"), parse_client_timeout("90")
        (0.0, 90.0)
    """
    raw = text.strip().lower()
    if raw in ("off", "none"):
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= threading.TIMEOUT_MAX):
        raise ConfigError(
            f"client_timeout must be a number of seconds >= 0, or off for no limit; got {text!r}"
        )
    return value


def unreadable_reason(exc: BaseException) -> str:
    """Say in a few words why a text file could not be read.

    Args:
        exc: What reading it raised.

    Returns:
        ``"not UTF-8 text (byte 0xff at offset 0)"``, the system's reason for an
        ``OSError``, or the first line of the message.
    """
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def merge_config(base: RunConfig, *layers: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Return ``base`` updated by each layer in turn, validated.

    Args:
        base: The starting configuration (usually ``RunConfig()``).
        *layers: ``{key: value}`` dicts (a TOML file's table, command-line options); keys
            may use ``-`` or ``_``.
        source: How to name the layers in error messages (e.g. the file name).

    Returns:
        The merged configuration.

    Raises:
        ConfigError: For an unknown key, a value of the wrong type or out of range.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(check_keys(layer, source))
    if isinstance(merged.get("client_timeout"), str):
        merged["client_timeout"] = parse_client_timeout(merged["client_timeout"])
    config = dataclasses.replace(base, **merged)
    for key in ("alpha", "sigma", "sample_ratio", "lr", "client_timeout", "rank_timeout"):
        value = getattr(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, float(value))
    config.validate()
    return config


def config_to_toml(config: RunConfig) -> dict[str, Any]:
    """Return the keys of ``config`` worth saving as ``RUN_DIR/config.toml``.

    ``output_dir`` (the file's own folder) and ``quiet`` are left out, as are options that
    are unset (``None``).

    Args:
        config: The configuration.

    Returns:
        A TOML-ready dict in field order.
    """
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _NOT_SAVED and getattr(config, f.name) is not None
    }
