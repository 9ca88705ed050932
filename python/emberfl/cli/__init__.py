"""The ``emberfl`` command line (also ``python -m emberfl``).

* ``emberfl run [OPTIONS]``: run a federated experiment (FedAvg on the offline UCI digits
  data set by default) into a run directory; ``--resume RUN_DIR`` continues a killed run.
* ``emberfl plot RUN_DIR``: accuracy and loss curves and the partition heatmap as PNG.
* ``emberfl report RUN_DIR``: configuration, summary table and partition statistics.

User errors (a bad option value, an impossible partition, a missing data set, a corrupt
checkpoint, an unwritable output directory) print one ``emberfl: error: ...`` line on
stderr and exit with status 2 (usage errors: bad options and configurations) or 1 (the
rest); real bugs still show their traceback.

Example:
    >>> main(["run", "--help"])  # doctest: +ELLIPSIS
    usage: emberfl run ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from emberfl import __version__
from emberfl.errors import ConfigError, EmberflError, PartitionError

__all__ = ["build_parser", "main"]

_USAGE_ERRORS = (ConfigError, PartitionError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``PROG: error: MESSAGE``."""

    def error(self, message: str) -> NoReturn:
        """Print a one-line error with a pointer to ``--help`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _algorithm_lines() -> str:
    from emberfl.algorithms import ALGORITHMS

    width = max(len(name) for name in ALGORITHMS)
    rows = [f"  {name:<{width}}  {cls.summary}" for name, cls in ALGORITHMS.items()]
    return "algorithms (--algorithm):\n" + "\n".join(rows)


def _run_options() -> list[_RunOption]:
    from emberfl.cli.config import ALGORITHMS, MODES
    from emberfl.data import DATASET_NAMES, PARTITION_METHODS
    from emberfl.models import MODEL_NAMES

    return [
        (
            "--output-dir",
            "output_dir",
            str,
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
            str,
            None,
            "DIR",
            "folder holding cifar10 / cifar100 / mnist / fashion-mnist (nothing is downloaded)",
        ),
        (
            "--partition",
            "partition",
            str,
            PARTITION_METHODS,
            "METHOD",
            "how the training data is split among clients",
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
    ]


def _add_run_parser(commands: Any) -> None:
    from emberfl.cli.config import RunConfig

    defaults = RunConfig()
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
        ),
    )
    run.add_argument("--config", metavar="FILE", help="read options from this TOML file")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last checkpoint (only --rounds, --mode, "
        "--parallelism, --device, --checkpoint-every and --quiet may change)",
    )
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
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or tables; print only the run directory",
    )
    run.set_defaults(handler=_cmd_run)


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
    plot = commands.add_parser(
        "plot",
        help="draw a run's accuracy and loss curves and partition heatmap",
        description="Render RUN_DIR's accuracy.png, loss.png and partition.png.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by emberfl run")
    plot.add_argument(
        "--out-dir", metavar="DIR", help="write the PNG files here (default: RUN_DIR)"
    )
    plot.set_defaults(handler=_cmd_plot)
    report = commands.add_parser(
        "report",
        help="print a run's configuration, summary and partition statistics",
        description="Print RUN_DIR's configuration, summary table and partition statistics.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by emberfl run")
    report.set_defaults(handler=_cmd_report)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from emberfl.cli.config import RunConfig, check_keys, load_config_file, merge_config
    from emberfl.cli.run import resume_config, run_experiment

    keys = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in keys}
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError(
                "--resume reads RUN_DIR/config.toml; drop --config (change rounds, mode, "
                "parallelism, device or checkpoint-every with their options)"
            )
        run_dir = Path(args.resume)
        if "output_dir" in options and Path(options["output_dir"]) != run_dir:
            raise ConfigError("--resume RUN_DIR writes into RUN_DIR; drop --output-dir")
        run_experiment(resume_config(run_dir, options), run_dir=run_dir, resume=True)
        return 0
    layers: list[dict[str, Any]] = []
    if args.config is not None:
        layers.append(check_keys(load_config_file(args.config), args.config))
    layers.append(options)
    run_experiment(merge_config(RunConfig(), *layers, source="command line"))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from emberfl.cli.plot import plot_run

    written = plot_run(args.run_dir, out_dir=args.out_dir)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot in {args.run_dir} yet (no metrics, no partition.csv)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from emberfl.cli.report import format_report

    print(format_report(args.run_dir))
    return 0


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emberfl`` command line.

    Args:
        argv: The arguments (``sys.argv[1:]`` if ``None``).

    Returns:
        The exit status: 0 on success, 2 for usage errors (bad options, configurations or
        partitions), 1 for other emberfl errors (missing data set, corrupt checkpoint, a
        failing client), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc.code)
    try:
        status: int = args.handler(args)
    except _USAGE_ERRORS as exc:
        print(f"emberfl: error: {exc}", file=sys.stderr)
        return 2
    except EmberflError as exc:
        print(f"emberfl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
