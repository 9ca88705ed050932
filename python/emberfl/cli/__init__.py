"""The ``emberfl`` command line (also ``python -m emberfl``).

* ``emberfl run [OPTIONS]``: run a federated experiment (FedAvg on the offline UCI digits
  data set by default) into a run directory; ``--resume RUN_DIR`` continues a killed run.
* ``emberfl plot RUN_DIR``: accuracy and loss curves and the partition heatmap as PNG.
* ``emberfl report RUN_DIR``: configuration, summary table and partition statistics.

Errors print one ``emberfl: error: ...`` line on stderr (what failed, which file, what to
do) and no traceback; when the run directory exists the full traceback is appended to
``RUN_DIR/error.log`` and the line ends with ``details in RUN_DIR/error.log``. See
:func:`main` for the exit statuses. Real bugs (an exception that is neither an emberfl
error nor an ``OSError``) still show their traceback.

Example:
    >>> main(["run", "--help"])  # doctest: +ELLIPSIS
    usage: emberfl run ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import os
import shlex
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from emberfl import __version__
from emberfl.errors import CheckpointError, ClientError, ConfigError, EmberflError, PartitionError

__all__ = ["ERROR_LOG", "build_parser", "main"]

ERROR_LOG = "error.log"
"""The file inside a run directory that collects the tracebacks of failed commands."""

_USAGE_ERRORS = (ConfigError, PartitionError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``emberfl: error: MESSAGE``."""

    def error(self, message: str) -> NoReturn:
        """Print a one-line error with a pointer to ``--help`` and exit with status 2."""
        self.exit(2, f"emberfl: error: {message} (see {self.prog} --help)\n")


# (flag, config key, type, choices or None, metavar, help)
_RunOption = tuple[str, str, Any, tuple[str, ...] | None, str | None, str]

_SUFFIXES = {"k": 1000, "m": 1000_000}


def _count(text: str) -> int:
    """Parse ``4000``, ``4K`` or ``1.5M`` into a positive integer."""
    raw = text.strip().lower()
    scale = _SUFFIXES.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 4000 or 4K)") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole count")
    return int(value)


def _path(text: str) -> str:
    """Accept a non-empty path (``''`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _timeout(text: str) -> float:
    """Parse ``--client-timeout``: seconds, or ``0`` / ``off`` for no limit."""
    from emberfl.cli.config import parse_client_timeout

    try:
        return parse_client_timeout(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _betas(text: str) -> list[float]:
    """Parse ``0.9,0.99`` (or ``0.9``) into a list of decays."""
    try:
        betas = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one or two comma-separated numbers (e.g. 0.9,0.99)"
        ) from None
    return betas


def _widths(text: str) -> list[int]:
    """Parse ``1700`` or ``200,200`` into a list of positive widths."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of widths (e.g. 200,200)"
        ) from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every width must be >= 1")
    return widths


def _loggers(text: str) -> list[str]:
    """Parse ``tensorboard`` or ``tensorboard,mlflow`` into tracker names."""
    from emberfl.cli.trackers import LOGGERS

    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose trackers from {', '.join(LOGGERS)} (comma-separated)"
        )
    return names


def _algorithm_lines() -> str:
    from emberfl.algorithms import ALGORITHMS

    summaries = {name: cls.summary for name, cls in ALGORITHMS.items()}
    summaries["fedasync"] = (
        "FedAsync (Xie 2019): every report mixed into the model, weighted by its staleness "
        "(asynchronous, on a virtual clock)"
    )
    summaries["fedbuff"] = (
        "FedBuff (Nguyen 2022): a server step every --buffer-size reports (asynchronous, on "
        "a virtual clock)"
    )
    width = max(len(name) for name in summaries)
    rows = [f"  {name:<{width}}  {text}" for name, text in summaries.items()]
    return "algorithms (--algorithm):\n" + "\n".join(rows)


def _run_options() -> list[_RunOption]:
    from emberfl.cli.config import (
        AGGREGATOR_NAMES,
        ALGORITHMS,
        ATTACK_NAMES,
        COMPRESSION_NAMES,
        DP_MODES,
        MODES,
        PARTITIONS,
        STALENESS_NAMES,
    )
    from emberfl.data import DATASET_NAMES
    from emberfl.models import MODEL_NAMES
    from emberfl.selection import SELECTIONS

    return [
        (
            "--output-dir",
            "output_dir",
            _path,
            None,
            "DIR",
            "the run directory to create (default: runs/<dataset>-<algorithm>-<date>-<time>)",
        ),
        (
            "--algorithm",
            "algorithm",
            str,
            ALGORITHMS,
            "NAME",
            "the federated algorithm (each is listed below)",
        ),
        ("--model", "model", str, MODEL_NAMES, "NAME", "the model to train"),
        (
            "--dataset",
            "dataset",
            str,
            DATASET_NAMES,
            "NAME",
            "the data set (digits and synthetic-cifar10 need no files)",
        ),
        (
            "--data-root",
            "data_root",
            _path,
            None,
            "DIR",
            "folder holding cifar10 / cifar100 / mnist / fashion-mnist (nothing is downloaded)",
        ),
        (
            "--partition",
            "partition",
            str,
            PARTITIONS,
            "METHOD",
            "how the training data is split among clients (natural: the clients the data "
            "set comes with: synthetic, fcube; feature-noise: IID with more noise on "
            "each next client's inputs)",
        ),
        (
            "--noise",
            "noise",
            float,
            None,
            "S",
            "feature-noise: client k of N gets Gaussian noise of std S (k+1)/N on its inputs "
            "(default 0.1)",
        ),
        (
            "--synthetic-alpha",
            "synthetic_alpha",
            float,
            None,
            "A",
            "--dataset synthetic: FedProx's alpha, how far the clients' labelling rules "
            "differ (default 1)",
        ),
        (
            "--synthetic-beta",
            "synthetic_beta",
            float,
            None,
            "B",
            "--dataset synthetic: FedProx's beta, how far the clients' inputs differ (default 1)",
        ),
        (
            "--alpha",
            "alpha",
            float,
            None,
            "A",
            "Dirichlet concentration for dirichlet, "
            "iid-dirichlet, client-dirichlet; smaller is more skewed (default: 0.5)",
        ),
        (
            "--sigma",
            "sigma",
            float,
            None,
            "S",
            "lognormal shape of client sizes for iid-lognormal (default: 0.5)",
        ),
        (
            "--shards-per-client",
            "shards_per_client",
            int,
            None,
            "N",
            "shards per client for shards (default: 2)",
        ),
        (
            "--classes-per-client",
            "classes_per_client",
            int,
            None,
            "N",
            "classes per client for label-quantity (default: 2)",
        ),
        (
            "--min-size",
            "min_size",
            int,
            None,
            "N",
            "smallest client for dirichlet, "
            "iid-dirichlet, iid-lognormal (default: min(10, train size // (4 x clients)))",
        ),
        (
            "--train-size",
            "train_size",
            _count,
            None,
            "N",
            "use N training samples (e.g. 4000 or 4K), drawn with the seed before partitioning; "
            "for quick runs (default: all)",
        ),
        (
            "--logger",
            "logger",
            _loggers,
            None,
            "NAME[,NAME]",
            "also log the config and every metric to experiment trackers, offline by default: "
            'tensorboard, wandb, mlflow (pip install "emberfl[tensorboard]" ...)',
        ),
        (
            "--hidden-sizes",
            "hidden_sizes",
            _widths,
            None,
            "A,B,...",
            "hidden layer widths of --model mlp (default: 200,200)",
        ),
        ("--num-clients", "num_clients", int, None, "N", "clients in the federation"),
        ("--rounds", "rounds", int, None, "N", "communication rounds"),
        (
            "--sample-ratio",
            "sample_ratio",
            float,
            None,
            "R",
            "fraction of clients training in each round, in (0, 1]",
        ),
        ("--epochs", "epochs", int, None, "N", "local epochs per round"),
        ("--batch-size", "batch_size", int, None, "N", "local batch size"),
        ("--lr", "lr", float, None, "LR", "local SGD learning rate"),
        (
            "--optimizer",
            "optimizer",
            str,
            ("sgd", "adam"),
            "NAME",
            "the local optimiser (fednova, scaffold and qffl assume SGD steps)",
        ),
        ("--momentum", "momentum", float, None, "M", "local SGD momentum (default: 0)"),
        (
            "--weight-decay",
            "weight_decay",
            float,
            None,
            "WD",
            "local SGD weight decay (default: 0)",
        ),
        (
            "--adam-betas",
            "adam_betas",
            _betas,
            None,
            "B1,B2",
            "Adam's moment decays with --optimizer adam (default: 0.9,0.999)",
        ),
        ("--adam-eps", "adam_eps", float, None, "EPS", "Adam's epsilon (default: 1e-8)"),
        (
            "--stragglers",
            "stragglers",
            float,
            None,
            "F",
            "fraction of clients that run 1..--epochs epochs (uniform) in a round instead of "
            "--epochs, as FedProx's systems heterogeneity (default: 0)",
        ),
        (
            "--server-lr",
            "server_lr",
            float,
            None,
            "LR",
            "server learning rate eta_g (default: 1; 0.1 for fedadagrad, fedadam, fedyogi; "
            "not feddyn, qffl)",
        ),
        (
            "--server-momentum",
            "server_momentum",
            float,
            None,
            "BETA",
            "fedavgm's server momentum (default: 0.9)",
        ),
        (
            "--server-betas",
            "server_betas",
            _betas,
            None,
            "B1,B2",
            "fedadam's and fedyogi's moment decays (default: 0.9,0.99); fedadagrad: B1 only",
        ),
        (
            "--server-tau",
            "server_tau",
            float,
            None,
            "TAU",
            "fedadagrad's, fedadam's and fedyogi's adaptivity (default: 1e-3)",
        ),
        (
            "--prox-mu",
            "prox_mu",
            float,
            None,
            "MU",
            "fedprox's proximal coefficient (default: 0.01)",
        ),
        ("--qffl-q", "qffl_q", float, None, "Q", "q-ffl's fairness exponent (default 1)"),
        (
            "--ditto-lambda",
            "ditto_lambda",
            float,
            None,
            "LAMBDA",
            "ditto's pull of personal models towards the global one (default 0.1)",
        ),
        (
            "--ifca-clusters",
            "ifca_clusters",
            int,
            None,
            "K",
            "ifca's number of cluster models (default 2)",
        ),
        (
            "--perfedavg-alpha",
            "perfedavg_alpha",
            float,
            None,
            "ALPHA",
            "perfedavg's inner (adaptation) step size (default 0.01; the outer one is --lr)",
        ),
        (
            "--fedasync-alpha",
            "fedasync_alpha",
            float,
            None,
            "ALPHA",
            "fedasync's mixing weight, in (0, 1] (default 0.6)",
        ),
        (
            "--staleness",
            "staleness",
            str,
            STALENESS_NAMES,
            "FUNC",
            "fedasync's staleness weighting: constant, polynomial ((1+s)^-a) or hinge (1 up "
            "to b, then 1/(a(s-b)+1)); default polynomial",
        ),
        (
            "--staleness-a",
            "staleness_a",
            float,
            None,
            "A",
            "the staleness decay a (default 0.5 for polynomial, 10 for hinge)",
        ),
        ("--staleness-b", "staleness_b", float, None, "B", "hinge's threshold b (default 4)"),
        (
            "--buffer-size",
            "buffer_size",
            int,
            None,
            "K",
            "fedbuff's reports per server update (default min(10, --concurrency))",
        ),
        (
            "--concurrency",
            "concurrency",
            int,
            None,
            "N",
            "fedasync's and fedbuff's clients in flight (default: the clients per round); "
            "with them --rounds counts server updates",
        ),
        (
            "--client-speed",
            "client_speed",
            str,
            None,
            "lognormal:MU,SIGMA",
            "fedasync's and fedbuff's virtual seconds per client task, exp(MU + SIGMA z) with "
            "z from each client's stream (default lognormal:0,1)",
        ),
        (
            "--aggregator",
            "aggregator",
            str,
            AGGREGATOR_NAMES,
            "RULE",
            "the server's rule for the clients' updates (default: mean; the others keep "
            "every update of a round: " + ", ".join(AGGREGATOR_NAMES[1:]) + ")",
        ),
        (
            "--trim-ratio",
            "trim_ratio",
            float,
            None,
            "BETA",
            "trimmed-mean's fraction dropped at each end, in [0, 0.5) (default 0.1)",
        ),
        (
            "--byzantine-f",
            "byzantine_f",
            int,
            None,
            "F",
            "krum's, multi-krum's and bulyan's Byzantine clients per round (default: the "
            "expected malicious clients per round; krum needs 2F+3 clients per round, "
            "bulyan 4F+3)",
        ),
        (
            "--clip-norm",
            "clip_norm",
            float,
            None,
            "C",
            "clipped-mean's bound on each update's L2 norm (required with it)",
        ),
        (
            "--attack",
            "attack",
            str,
            ATTACK_NAMES,
            "NAME",
            "simulated Byzantine clients: label-flip (train on y -> C-1-y), sign-flip (send "
            "-S x delta), gaussian (send noise), scale (send S x delta); default none",
        ),
        (
            "--malicious-fraction",
            "malicious_fraction",
            float,
            None,
            "F",
            "fraction of the clients that attack (a set fixed for the run, drawn from the "
            "seed; required with --attack)",
        ),
        (
            "--attack-scale",
            "attack_scale",
            float,
            None,
            "S",
            "sign-flip's factor (default 4) and scale's (default 10)",
        ),
        ("--attack-std", "attack_std", float, None, "STD", "gaussian's std (default 1)"),
        (
            "--dp",
            "dp",
            str,
            DP_MODES,
            "MODE",
            "central: client-level differential privacy (DP-FedAvg: Poisson sampling at "
            "--sample-ratio, clipped updates, Gaussian noise); local: record-level DP-SGD on "
            "every client (per-sample gradients clipped to --dp-clip-norm, Gaussian noise each "
            "step); dp_epsilon logged each round; default none",
        ),
        (
            "--dp-noise-multiplier",
            "dp_noise_multiplier",
            float,
            None,
            "SIGMA",
            "the noise's std over the clip norm (default 1.0)",
        ),
        (
            "--dp-clip-norm",
            "dp_clip_norm",
            float,
            None,
            "C",
            "the L2 bound on each update (central) or each sample's gradient (local); default 1",
        ),
        ("--dp-delta", "dp_delta", float, None, "DELTA", "delta of the reported epsilon (1e-5)"),
        (
            "--dp-target-epsilon",
            "dp_target_epsilon",
            float,
            None,
            "EPS",
            "central: choose the smallest noise multiplier that spends at most EPS after "
            "--rounds rounds (instead of --dp-noise-multiplier)",
        ),
        (
            "--dp-adaptive-clip-quantile",
            "dp_adaptive_clip_quantile",
            float,
            None,
            "Q",
            "adapt the clip norm to this quantile of the update norms (Andrew 2021), starting "
            "from --dp-clip-norm; default: a fixed clip norm",
        ),
        (
            "--compression",
            "compression",
            str,
            COMPRESSION_NAMES,
            "NAME",
            "compress each client's update: topk, randk (with error feedback), qsgd, sign "
            "(scaled sign with error feedback); uplink_bytes counts the payloads; default none",
        ),
        (
            "--compression-ratio",
            "compression_ratio",
            float,
            None,
            "R",
            "topk's and randk's fraction of entries sent, in (0, 1] (default 0.01)",
        ),
        ("--qsgd-levels", "qsgd_levels", int, None, "S", "qsgd's levels (default 16)"),
        (
            "--client-test-fraction",
            "client_test_fraction",
            float,
            None,
            "F",
            "hold out this fraction of each client's data as its own test split and log "
            "client_test_accuracy (and personal_test_accuracy for ditto, fedbn, ifca and "
            "perfedavg); "
            "default 0.2 for those, else 0",
        ),
        (
            "--client-selection",
            "client_selection",
            str,
            SELECTIONS,
            "RULE",
            "how a round's clients are chosen (size: in proportion to their data; "
            "power-of-choice: the highest-loss of --poc-candidates drawn by size)",
        ),
        (
            "--poc-candidates",
            "poc_candidates",
            int,
            None,
            "D",
            "power-of-choice's candidates per round (default: 2x the clients per round)",
        ),
        (
            "--feddyn-alpha",
            "feddyn_alpha",
            float,
            None,
            "ALPHA",
            "feddyn's regularisation coefficient (default: 0.01)",
        ),
        (
            "--mode",
            "mode",
            str,
            MODES,
            "MODE",
            "execution mode; serial, thread and process give bitwise identical results, "
            "vectorized (many clients as one stacked model) the same up to float rounding",
        ),
        (
            "--parallelism",
            "parallelism",
            int,
            None,
            "N",
            "threads or processes for thread / process mode, chunks at once for vectorized "
            "mode (0: one per CPU core)",
        ),
        (
            "--chunk-size",
            "chunk_size",
            int,
            None,
            "N",
            "clients trained at once in vectorized mode (default: the trainer's)",
        ),
        ("--device", "device", str, None, "DEV", "auto (CUDA when available), cpu, cuda or cuda:N"),
        (
            "--seed",
            "seed",
            int,
            None,
            "N",
            "experiment seed: partition, sampling, model init and shuffling derive from it",
        ),
        (
            "--checkpoint-every",
            "checkpoint_every",
            int,
            None,
            "N",
            "checkpoint every N rounds (0: only after the last round)",
        ),
        (
            "--client-timeout",
            "client_timeout",
            _timeout,
            None,
            "SECONDS",
            "stop the run with an error naming the client when one trains longer than this "
            "(0 or off: no limit; it can change on --resume) (default: 600)",
        ),
        (
            "--rank-timeout",
            "rank_timeout",
            float,
            None,
            "SECONDS",
            "under torchrun: stop every rank with an error naming the rank that sent no "
            "heartbeat for this long (hung or lost)",
        ),
    ]


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a federated experiment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_algorithm_lines(),
        description=textwrap.fill(
            "Run a federated-learning experiment and write its results (config.toml, "
            "metrics.jsonl / .csv, partition.csv / .png, checkpoint/, "
            "final_model.safetensors) to a run directory. With no options: FedAvg on the "
            "offline UCI digits data set over 10 non-IID clients. Options can also come from "
            "a TOML file (--config; keys are the option names, e.g. num_clients = 20); "
            "command-line options override it.",
            width=88,
        )
        + "\n\n"
        + textwrap.fill(
            "Errors are one line on stderr; the traceback goes to RUN_DIR/error.log. Exit "
            "status: 0 on success; 2 for a bad option, config file or output directory "
            "(nothing is run); 1 for a failure on the way (a client, a full disk, a damaged "
            "run directory); 130 on Ctrl-C.",
            width=88,
        ),
    )
    run.add_argument(
        "--config", metavar="FILE", type=_path, help="read options from this TOML file"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=_path,
        help="continue a killed run from its last checkpoint (only --rounds, --mode, "
        "--parallelism, --chunk-size, --device, --checkpoint-every, --client-timeout, "
        "--rank-timeout, --logger and --quiet may change, and not in ways that change the "
        "results' bits: to or from vectorized mode, another chunk split, CPU to CUDA)",
    )
    _add_run_options(run)
    run.set_defaults(handler=_cmd_run)


def _add_run_options(run: argparse.ArgumentParser) -> None:
    from emberfl.cli.config import RunConfig

    defaults = RunConfig()
    for flag, key, type_, choices, metavar, text in _run_options():
        default = getattr(defaults, key)
        if choices is not None:
            text = f"{text}: {', '.join(choices)}"
        if default is not None and "(default" not in text:
            text = f"{text} (default: {default})"
        run.add_argument(
            flag,
            dest=key,
            type=type_,
            choices=choices,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=text,
        )
    run.add_argument(
        "--no-error-feedback",
        dest="error_feedback",
        action="store_false",
        default=argparse.SUPPRESS,
        help="compressing clients drop what their payload leaves out instead of sending it "
        "in later rounds",
    )
    run.add_argument(
        "--augment",
        dest="augment",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="random crop (padding 4) and horizontal flip of every client training batch, "
        "drawn from the client's own stream (default: on for cifar10 and cifar100)",
    )
    run.add_argument(
        "--drop-stragglers",
        dest="drop_stragglers",
        action="store_true",
        default=argparse.SUPPRESS,
        help="leave the clients that would not finish --epochs out of the round (FedAvg "
        "with a deadline, FedProx's baseline) instead of using their partial work",
    )
    run.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or tables; print only the run directory",
    )


def _add_sweep_parsers(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a grid of experiments over seeds and options",
        description=textwrap.fill(
            "Run every combination of --grid values with every seed of --seeds, each point "
            "an emberfl run directory under the sweep directory (--output-dir; default "
            "runs/sweep-<date>-<time>) named by its values. The other options are emberfl "
            "run's and apply to every point; a --config file may hold a [sweep] table "
            "(seeds = [0, 1, 2] and a [sweep.grid] table of lists). Running the same sweep "
            "again, or --resume SWEEP_DIR, skips finished points, resumes killed ones from "
            "their checkpoints and starts the rest. Ends with emberfl compare's table.",
            width=88,
        ),
    )
    sweep.add_argument(
        "--config",
        metavar="FILE",
        type=_path,
        help="read options (and [sweep]) from this TOML file",
    )
    sweep.add_argument(
        "--resume", metavar="SWEEP_DIR", type=_path, help="continue the sweep in SWEEP_DIR"
    )
    sweep.add_argument(
        "--seeds", metavar="SEEDS", help="the seeds: 3, 0-4 or 0,2,7 (default: the --seed)"
    )
    sweep.add_argument(
        "--grid",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        help="an option and its values, e.g. algorithm=fedavg,fedprox (repeat for a grid)",
    )
    sweep.add_argument(
        "--jobs", metavar="N", type=int, default=1, help="points run at once (default: 1)"
    )
    sweep.add_argument(
        "--target", metavar="ACC", type=float, help="compare's rounds-to-accuracy target, e.g. 0.9"
    )
    _add_run_options(sweep)
    sweep.set_defaults(handler=_cmd_sweep)
    comp = commands.add_parser(
        "compare",
        help="compare runs and sweeps: mean +- std over seeds, one plot",
        description=textwrap.fill(
            "Group the runs under the given run and sweep directories by configuration "
            "without the seed; print each group's final and best test accuracy (and rounds "
            "to --target) as mean +- std over its seeds, and write compare.csv and "
            "compare.png (each group's mean curve and its +-1 std band).",
            width=88,
        ),
    )
    comp.add_argument("dirs", metavar="DIR", nargs="+", type=_path, help="run or sweep directories")
    comp.add_argument(
        "--target", metavar="ACC", type=float, help="report the rounds to this test accuracy"
    )
    comp.add_argument(
        "--out-dir",
        metavar="DIR",
        type=_path,
        help="where compare.csv and compare.png go (default: the first DIR if it is a sweep, "
        "else the current directory)",
    )
    comp.set_defaults(handler=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``emberfl`` argument parser with its ``run``, ``plot`` and ``report`` commands.

    Returns:
        The parser; each command sets ``handler`` to the function that runs it.
    """
    parser = _Parser(
        prog="emberfl",
        description="Fast, deterministic federated-learning simulation for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"emberfl {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_run_parser(commands)
    _add_sweep_parsers(commands)
    plot = commands.add_parser(
        "plot",
        help="draw a run's accuracy and loss curves and partition heatmap",
        description="Render RUN_DIR's accuracy.png, loss.png and partition.png.",
    )
    plot.add_argument(
        "run_dir", metavar="RUN_DIR", type=_path, help="a directory written by emberfl run"
    )
    plot.add_argument(
        "--out-dir", metavar="DIR", type=_path, help="write the PNG files here (default: RUN_DIR)"
    )
    plot.set_defaults(handler=_cmd_plot)
    report = commands.add_parser(
        "report",
        help="print a run's configuration, summary and partition statistics",
        description="Print RUN_DIR's configuration, summary table and partition statistics.",
    )
    report.add_argument(
        "run_dir", metavar="RUN_DIR", type=_path, help="a directory written by emberfl run"
    )
    report.set_defaults(handler=_cmd_report)
    return parser


@dataclass
class _Context:
    """What an error message may point to: the command's run directory, if it has one."""

    argv: list[str]
    run_dir: Path | None = None
    resumable: bool = False  # a run command: the line says how to resume


def _cmd_run(args: argparse.Namespace) -> int:
    from emberfl.cli.config import RunConfig, check_keys, load_config_file, merge_config
    from emberfl.cli.run import default_run_dir, resume_config, run_experiment

    context: _Context = args.context
    keys = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in keys}
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError(
                "--resume reads RUN_DIR/config.toml; drop --config (change rounds, mode, "
                "parallelism, chunk-size, device, checkpoint-every or client-timeout with "
                "their options)"
            )
        run_dir = Path(args.resume)
        if "output_dir" in options and Path(options["output_dir"]) != run_dir:
            raise ConfigError("--resume RUN_DIR writes into RUN_DIR; drop --output-dir")
        context.run_dir, context.resumable = run_dir, True
        run_experiment(resume_config(run_dir, options), run_dir=run_dir, resume=True)
        return 0
    layers: list[dict[str, Any]] = []
    if args.config is not None:
        blob = load_config_file(args.config)
        if "sweep" in blob:
            raise ConfigError(
                f"{args.config} has a [sweep] table: run it with `emberfl sweep --config "
                f"{args.config}`"
            )
        layers.append(check_keys(blob, args.config))
    layers.append(options)
    config = merge_config(RunConfig(), *layers, source="command line")
    run_dir = Path(config.output_dir) if config.output_dir else default_run_dir(config)
    context.run_dir, context.resumable = run_dir, True
    run_experiment(config, run_dir=run_dir)
    return 0


def _run_option_types() -> dict[str, Any]:
    types: dict[str, Any] = {key: type_ for _, key, type_, _, _, _ in _run_options()}
    for key in ("augment", "drop_stragglers", "error_feedback"):
        types[key] = _boolean
    return types


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from emberfl.cli.config import (
        RunConfig,
        check_keys,
        config_to_toml,
        load_config_file,
        merge_config,
    )
    from emberfl.cli.sweep import (
        SWEEP_FILE,
        Sweep,
        compare,
        format_compare,
        parse_grid,
        parse_seeds,
        run_sweep,
        write_compare,
    )

    keys = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in keys}
    if args.resume is not None:
        if args.config is not None or args.grid or args.seeds or options:
            raise ConfigError(
                "--resume SWEEP_DIR reads SWEEP_DIR/sweep.toml; drop the other options"
            )
        sweep_dir = Path(args.resume)
        sweep = Sweep.from_toml(sweep_dir / SWEEP_FILE)
    else:
        layers: list[dict[str, Any]] = []
        table: dict[str, Any] = {}
        if args.config is not None:
            blob = dict(load_config_file(args.config))
            table = blob.pop("sweep", {})
            if not isinstance(table, dict) or not set(table) <= {"seeds", "grid"}:
                raise ConfigError(f"{args.config}: [sweep] takes seeds and a [sweep.grid] table")
            layers.append(check_keys(blob, args.config))
        layers.append({k: v for k, v in options.items() if k != "output_dir"})
        base_config = merge_config(RunConfig(), *layers, source="command line")
        types = _run_option_types()
        grid_items = [
            f"{k}={','.join(str(x) for x in v)}" for k, v in table.get("grid", {}).items()
        ]
        grid = parse_grid([*grid_items, *args.grid], types)
        seeds_value = args.seeds if args.seeds is not None else table.get("seeds")
        if seeds_value is None:
            seeds = [base_config.seed]
        elif isinstance(seeds_value, list):
            seeds = parse_seeds(",".join(str(int(v)) for v in seeds_value))
        else:
            seeds = parse_seeds(str(seeds_value))
        base = config_to_toml(base_config)
        base.pop("seed", None)
        sweep = Sweep(base=base, grid=grid, seeds=seeds)
        if "output_dir" in options:
            sweep_dir = Path(options["output_dir"])
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            sweep_dir = Path("runs") / f"sweep-{base_config.dataset}-{stamp}"
    args.context.run_dir = sweep_dir
    print(f"sweep {sweep_dir}: {len(sweep.points())} points", flush=True)
    failed = run_sweep(sweep, sweep_dir, jobs=args.jobs)
    groups = compare([sweep_dir])
    print(format_compare(groups, target=args.target))
    for path in write_compare(groups, sweep_dir, target=args.target):
        print(path)
    if failed:
        print(
            f"emberfl: error: {failed} point(s) failed (their sweep.log says why); fix and "
            f"continue with `emberfl sweep --resume {sweep_dir}`",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from emberfl.cli.sweep import SWEEP_FILE, compare, format_compare, write_compare

    groups = compare(args.dirs)
    print(format_compare(groups, target=args.target))
    out = args.out_dir
    if out is None:
        first = Path(args.dirs[0])
        out = first if (first / SWEEP_FILE).is_file() else Path.cwd()
    for path in write_compare(groups, Path(out), target=args.target):
        print(path)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from emberfl.cli.plot import plot_run

    args.context.run_dir = Path(args.run_dir)
    written = plot_run(args.run_dir, out_dir=args.out_dir)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot in {args.run_dir} yet (no metrics, no partition.csv)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from emberfl.cli.report import format_report

    args.context.run_dir = Path(args.run_dir)
    print(format_report(args.run_dir))
    return 0


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines()]
    return lines[0] if lines else ""


def _checkpoint_note(run_dir: Path, *, save_failed: bool) -> str:
    """Say which round the run's checkpoint holds (read back, so it is known to be whole)
    and how to resume; ``""`` when there is nothing useful to say."""
    from emberfl.cli.checkpoint import CHECKPOINT_DIR, load_checkpoint
    from emberfl.cli.run import CONFIG_FILE

    try:
        checkpoint = load_checkpoint(run_dir)
    except (EmberflError, OSError, ValueError):
        return ""
    folder = run_dir / CHECKPOINT_DIR
    resume = f"emberfl run --resume {run_dir}"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        resume = f"the same torchrun command running `{resume}`"
    if checkpoint is not None:
        held = "still holds" if save_failed else "holds"
        return f"the checkpoint in {folder} {held} round {checkpoint.round} (resume with: {resume})"
    if save_failed or (run_dir / CONFIG_FILE).is_file():
        return f"no checkpoint was saved yet ({resume} starts the run again from round 0)"
    return ""


def _write_error_log(context: _Context, exc: BaseException) -> Path | None:
    """Append ``exc``'s traceback to ``RUN_DIR/error.log``; ``None`` if it cannot be."""
    from emberfl.atomic import append_text

    if context.run_dir is None or not context.run_dir.is_dir():
        return None
    path = context.run_dir / ERROR_LOG
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    text = (
        f"--- {stamp} emberfl {__version__}: emberfl {shlex.join(context.argv)}\n"
        + "".join(traceback.format_exception(exc))
        + "\n"
    )
    try:
        append_text(path, text)
    except OSError:
        return None
    return path


def _os_error_line(exc: OSError) -> str:
    """What failed, which file and what to do, for an ``OSError``."""
    from emberfl.cli.run import file_in_the_way

    why = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename
    if not isinstance(name, str | bytes | os.PathLike):  # None, or a file descriptor
        return why
    path = Path(os.fsdecode(name))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = file_in_the_way(path if exc.errno == errno.EEXIST else path.parent)
        if blocker is not None:
            return f"{blocker} is a file where a folder is needed ({why}); move it away"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"could not write {path}: {why}; free some disk space"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: {why}; check the permissions of it and its folder"
    if exc.errno == errno.EROFS:
        return f"cannot write {path}: {why}; choose a folder on a writable file system"
    if exc.errno == errno.EISDIR:
        return f"{path} is a folder where a file is needed ({why}); move it away"
    return f"{path}: {why}"


def _report(context: _Context, exc: BaseException, message: str, *, status: int) -> int:
    """Print ``emberfl: error: MESSAGE`` on one line, with a resume note and the
    ``error.log`` pointer where they apply, and return ``status``."""
    from emberfl.cli.checkpoint import CheckpointSaveError

    parts = [_first_line(message) or type(exc).__name__]
    if status != 2:
        # Whether the run can be resumed: not when its checkpoint is the problem.
        if (
            context.resumable
            and context.run_dir is not None
            and not isinstance(exc, CheckpointError)
        ):
            save_failed = isinstance(exc, CheckpointSaveError)
            note = _checkpoint_note(context.run_dir, save_failed=save_failed)
            if note:
                parts.append(note)
        log = _write_error_log(context, exc)
        if log is not None:
            parts.append(f"details in {log}")
    print("emberfl: error: " + "; ".join(parts), file=sys.stderr)
    return status


_TERMINATED = "terminated by SIGTERM"


class _TermSignal:
    """While active, ``SIGTERM`` stops the command as Ctrl-C does (the workers are
    stopped, the shared memory released, the last checkpoint kept) instead of killing the
    process on the spot; a second ``SIGTERM`` kills it. Inactive outside the main thread
    or when the program has its own handler."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one kills
        raise KeyboardInterrupt(_TERMINATED)

    def __enter__(self) -> _TermSignal:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emberfl`` command line.

    Every failure prints exactly one line on stderr, ``emberfl: error: ...`` (what failed,
    which file, what to do), never a traceback; when the command has a run directory
    that exists, the full traceback is appended to ``RUN_DIR/error.log`` and the line
    ends with ``details in RUN_DIR/error.log``. A failed ``run`` also says which round
    the kept checkpoint holds and how to resume. A client's failure shows its one-line
    summary (:attr:`emberfl.errors.ClientError.summary`); the worker's traceback is in
    ``error.log``. Only exceptions that are neither emberfl errors nor ``OSError`` /
    ``UnicodeDecodeError`` (bugs) propagate with their traceback.

    Args:
        argv: The arguments (``sys.argv[1:]`` if ``None``).

    Returns:
        The exit status:

        * 0: success;
        * 2: usage errors, found before anything is run: bad options, a bad configuration
          (the ``--config`` file or ``RUN_DIR/config.toml`` missing, not UTF-8, not
          TOML, duplicate or unknown keys, bad values), an impossible partition, an
          output directory or checkpoint folder that cannot be created or written, a
          ``--resume`` that would change the experiment or its bits;
        * 1: failures while working: I/O errors (a full disk, no permission, a file where
          a folder should be), a damaged run directory (corrupt checkpoint, a
          ``partition.csv`` or ``metrics.jsonl`` that is not UTF-8), a missing data set,
          a failing or timed-out client, a checkpoint that could not be saved (the
          previous one is kept);
        * 130: interrupted (Ctrl-C): ``emberfl: interrupted[: MESSAGE]`` on stderr, with
          the round the checkpoint holds and how to resume when the run has one;
        * 143: terminated by ``SIGTERM``, which stops the run as Ctrl-C does
          (``emberfl: terminated (SIGTERM)``, with the same checkpoint note).
    """
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:
        return _exit_status(exc.code)
    context = _Context(argv=arguments)
    args.context = context
    terminated = _TermSignal()
    try:
        with terminated:
            status: int = args.handler(args)
    except KeyboardInterrupt as exc:
        parts = ["emberfl: terminated (SIGTERM)" if terminated.received else "emberfl: interrupted"]
        message = _first_line(str(exc))
        if message and message != _TERMINATED:
            parts[0] += f": {message}"
        if context.resumable and context.run_dir is not None:
            note = _checkpoint_note(context.run_dir, save_failed=False)
            if note.startswith("the checkpoint"):
                parts.append(note)
        print("; ".join(parts), file=sys.stderr)
        return 128 + signal.SIGTERM if terminated.received else 130
    except _USAGE_ERRORS as exc:
        return _report(context, exc, str(exc), status=2)
    except ClientError as exc:
        return _report(context, exc, exc.summary, status=1)
    except EmberflError as exc:
        return _report(context, exc, str(exc), status=1)
    except UnicodeDecodeError as exc:
        from emberfl.cli.config import unreadable_reason

        return _report(context, exc, f"a file is {unreadable_reason(exc)}", status=1)
    except OSError as exc:
        return _report(context, exc, _os_error_line(exc), status=1)
    return status
