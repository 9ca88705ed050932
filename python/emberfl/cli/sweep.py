"""``emberfl sweep`` and ``emberfl compare``: a grid of runs over seeds and options, and
their comparison as mean +- std over seeds.

A sweep is a base configuration (the options of ``emberfl run``), a grid (``key`` ->
values) and seeds; its points are every combination of grid values with every seed. Each
point is an ordinary run directory under the sweep directory, named by its values
(``algorithm=fedprox,lr=0.05,seed=2``), run by ``emberfl run`` in a process of its own::

    SWEEP_DIR/sweep.toml                      the base configuration, grid and seeds
    SWEEP_DIR/<point>/                        an emberfl run directory per point
    SWEEP_DIR/compare.csv, compare.png        written by emberfl compare

Running the same sweep again (the same command, or ``emberfl sweep --resume SWEEP_DIR``)
skips the finished points, resumes a killed point from its checkpoint and starts the
others; ``--jobs N`` runs ``N`` points at once.

``emberfl compare`` groups runs by their configuration without the seed, and reports for
each group the final and best test accuracy and the rounds to a target accuracy (mean +-
sample standard deviation over the seeds), with one plot of every group's mean test
accuracy and its +-1 std band.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from emberfl.atomic import atomic_write_text, name_os_errors
from emberfl.cli.config import RunConfig, check_keys, config_to_toml, merge_config
from emberfl.cli.metrics import read_metrics
from emberfl.cli.run import CONFIG_FILE, FINAL_MODEL_FILE
from emberfl.errors import ConfigError

__all__ = [
    "COMPARE_CSV",
    "COMPARE_PNG",
    "SWEEP_FILE",
    "Group",
    "Sweep",
    "compare",
    "format_compare",
    "parse_grid",
    "parse_seeds",
    "run_sweep",
]

SWEEP_FILE = "sweep.toml"
"""The sweep's definition, in the sweep directory."""
COMPARE_CSV = "compare.csv"
"""``emberfl compare``'s table."""
COMPARE_PNG = "compare.png"
"""``emberfl compare``'s plot."""
_NOT_GRIDDED = frozenset({"seed", "output_dir", "quiet"})
_MAX_POINTS = 10_000


def parse_seeds(text: str) -> list[int]:
    """Parse ``--seeds``: ``3``, ``0-4`` (inclusive) or ``0,2,7`` (ranges may mix in).

    Args:
        text: The value.

    Returns:
        The seeds, without repeats, in the order given.

    Raises:
        ConfigError: For anything else, or a negative seed.
    """
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ConfigError(f"--seeds takes 3, 0-4 or 0,2,7; got {text!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"--seeds range {part.strip()!r} runs backwards")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    return seeds


def parse_grid(
    items: Sequence[str], types: Mapping[str, Callable[[str], Any]]
) -> dict[str, list[Any]]:
    """Parse ``--grid KEY=V1,V2,...`` options.

    Args:
        items: The options' values, e.g. ``["algorithm=fedavg,fedprox", "lr=0.05,0.1"]``.
        types: Each run option's parser (``emberfl run``'s argument types), by key.

    Returns:
        ``{key: [values]}`` in the order given, keys with ``_``.

    Raises:
        ConfigError: For a malformed item, an unknown or repeated key, the seed (use
            ``--seeds``) or a value its option does not take.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid takes KEY=VALUE,VALUE...; got {item!r}")
        if key in _NOT_GRIDDED:
            raise ConfigError(
                f"--grid {key}: {'use --seeds' if key == 'seed' else 'not an experiment option'}"
            )
        if key not in types:
            raise ConfigError(f"--grid {key}: not an option of emberfl run")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        parse = types[key]
        parsed = []
        for raw in values.split(","):
            try:
                parsed.append(parse(raw.strip()))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--grid {key}: {raw.strip()!r} is not a value ({exc})") from None
        grid[key] = list(dict.fromkeys(parsed))
    return grid


@dataclass(frozen=True)
class Sweep:
    """A sweep: a base configuration, a grid and seeds.

    Attributes:
        base: The options every point shares (``config.toml``'s keys).
        grid: ``{key: values}``, in order.
        seeds: The seeds.
    """

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]

    def points(self) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(directory name, options)`` of every point, grid-major, seeds last.

        Raises:
            ConfigError: For a point whose configuration is invalid.
        """
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            for seed in self.seeds:
                chosen = dict(zip(keys, values, strict=True))
                options = {**self.base, **chosen, "seed": seed}
                name = ",".join(f"{k}={_token(v)}" for k, v in [*chosen.items(), ("seed", seed)])
                merge_config(RunConfig(), options, source=f"sweep point {name}")
                out.append((name, options))
        return out

    def to_toml(self) -> str:
        """Return the sweep as ``sweep.toml``'s text."""
        return tomli_w.dumps({"seeds": self.seeds, "grid": self.grid, "base": self.base})

    @classmethod
    def from_toml(cls, path: Path) -> Sweep:
        """Read ``sweep.toml``.

        Raises:
            ConfigError: If it is missing or not a sweep.
        """
        try:
            blob = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path.parent} is not a sweep directory (no {SWEEP_FILE})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not a valid sweep file: {exc}") from None
        if not {"seeds", "grid", "base"} <= blob.keys():
            raise ConfigError(f"{path} is not a sweep file (needs seeds, grid and base)")
        return cls(base=dict(blob["base"]), grid=dict(blob["grid"]), seeds=list(blob["seeds"]))


def _token(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _state(run: Path) -> str:
    """``done``, ``resume`` (a checkpoint or a config) or ``new``."""
    if (run / FINAL_MODEL_FILE).is_file():
        return "done"
    if (run / CONFIG_FILE).is_file():
        return "resume"
    return "new"


def _final_line(run: Path) -> str:
    rows = read_metrics(run)
    accs = [r["test_accuracy"] for r in rows if isinstance(r.get("test_accuracy"), int | float)]
    if not accs:
        return "no metrics"
    return f"final {100 * accs[-1]:.2f}%, best {100 * max(accs):.2f}%"


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    *,
    jobs: int = 1,
    out: TextIO | None = None,
) -> int:
    """Run (or continue) a sweep: every unfinished point in a process of its own.

    Args:
        sweep: The sweep.
        sweep_dir: Its directory (created; its ``sweep.toml`` must match ``sweep``).
        jobs: How many points run at once (each with its own ``parallelism``).
        out: Where the progress lines go (stdout).

    Returns:
        The number of points that failed.

    Raises:
        ConfigError: For an invalid point, too many points, ``jobs < 1`` or a sweep
            directory that holds another sweep.
        KeyboardInterrupt: On Ctrl-C, after the running points stopped (they keep their
            checkpoints).
    """
    stream = out if out is not None else sys.stdout
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    points = sweep.points()
    if len(points) > _MAX_POINTS:
        raise ConfigError(f"the sweep has {len(points)} points; at most {_MAX_POINTS}")
    spec = sweep_dir / SWEEP_FILE
    if spec.exists():
        saved = Sweep.from_toml(spec)
        if saved.to_toml() != sweep.to_toml():
            raise ConfigError(
                f"{sweep_dir} holds another sweep ({SWEEP_FILE} differs); continue it with "
                f"`emberfl sweep --resume {sweep_dir}` or choose another --output-dir"
            )
    else:
        with name_os_errors(sweep_dir):
            sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(spec, sweep.to_toml())
    total = len(points)
    todo: list[tuple[int, str, dict[str, Any]]] = []
    for i, (name, options) in enumerate(points, 1):
        if _state(sweep_dir / name) == "done":
            print(
                f"[{i}/{total}] {name}: already done, {_final_line(sweep_dir / name)}", file=stream
            )
        else:
            todo.append((i, name, options))
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    running: dict[subprocess.Popen[bytes], tuple[int, str, float]] = {}
    failed = 0
    try:
        while todo or running:
            while todo and len(running) < jobs:
                i, name, options = todo.pop(0)
                running[_start(sweep_dir, name, options, env)] = (i, name, time.perf_counter())
            proc = _wait_any(running)
            i, name, started = running.pop(proc)
            seconds = time.perf_counter() - started
            run = sweep_dir / name
            if proc.returncode == 0:
                print(f"[{i}/{total}] {name}: {_final_line(run)} ({seconds:.1f} s)", file=stream)
            else:
                failed += 1
                tail = (run / "sweep.log").read_text(errors="replace").strip().splitlines()
                why = tail[-1] if tail else f"exit status {proc.returncode}"
                print(f"[{i}/{total}] {name}: FAILED: {why}", file=stream)
            stream.flush()
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise KeyboardInterrupt(
            f"the sweep stopped; continue it with `emberfl sweep --resume {sweep_dir}`"
        ) from None
    return failed


def _start(
    sweep_dir: Path, name: str, options: dict[str, Any], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    run = sweep_dir / name
    command = [sys.executable, "-m", "emberfl", "run", "--quiet"]
    if _state(run) == "resume":
        command += ["--resume", str(run)]
    else:
        run.mkdir(parents=True, exist_ok=True)
        point = run / "point.toml"
        atomic_write_text(point, tomli_w.dumps(options))
        command += ["--config", str(point), "--output-dir", str(run)]
    log = (run / "sweep.log").open("ab")
    try:
        return subprocess.Popen(
            command, stdout=log, stderr=log, env=env, preexec_fn=_stop_with_parent
        )
    finally:
        log.close()


def _stop_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the sweep's process dies (Linux),
    so a killed sweep leaves no point running; SIGTERM stops a run at its checkpoint."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _wait_any(running: Mapping[subprocess.Popen[bytes], Any]) -> subprocess.Popen[bytes]:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """Runs that differ only in their seed.

    Attributes:
        label: What sets the group apart (``algorithm=fedprox, lr=0.05``).
        config: The configuration without the seed.
        runs: The run directories.
        seeds: Their seeds.
        curves: Each run's ``(rounds, test accuracies)``.
    """

    label: str
    config: dict[str, Any]
    runs: list[Path]
    seeds: list[int]
    curves: list[tuple[list[int], list[float]]]

    def finals(self) -> list[float]:
        """Each run's last test accuracy."""
        return [accs[-1] for _, accs in self.curves if accs]

    def bests(self) -> list[float]:
        """Each run's best test accuracy."""
        return [max(accs) for _, accs in self.curves if accs]

    def rounds_to(self, target: float) -> list[int | None]:
        """Each run's first round with test accuracy >= ``target`` (``None``: never)."""
        return [
            next((r for r, a in zip(rounds, accs, strict=True) if a >= target), None)
            for rounds, accs in self.curves
        ]


def _runs_under(path: Path) -> list[Path]:
    if (path / CONFIG_FILE).is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path} is neither a run directory nor a sweep directory")
    runs = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file())
    if not runs:
        raise ConfigError(f"{path} holds no run directories (no */{CONFIG_FILE})")
    return runs


def compare(paths: Sequence[str | os.PathLike[str]]) -> list[Group]:
    """Group the runs under ``paths`` by configuration without the seed.

    Args:
        paths: Run directories and sweep directories (any directory of run directories).

    Returns:
        The groups, in the order their first runs were found.

    Raises:
        ConfigError: For a path that holds no runs or a run whose config.toml is invalid.
        CheckpointError: For a damaged metrics file.
    """
    runs: list[Path] = []
    for p in paths:
        runs.extend(r for r in _runs_under(Path(p)) if r not in runs)
    keyed: dict[str, Group] = {}
    configs: list[dict[str, Any]] = []
    for run in runs:
        try:
            blob = tomllib.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{run / CONFIG_FILE} is not valid: {exc}") from None
        config = config_to_toml(merge_config(RunConfig(), check_keys(blob, str(run / CONFIG_FILE))))
        seed = int(config.pop("seed"))
        key = tomli_w.dumps(config)
        rows = read_metrics(run)
        pairs = [
            (int(r["round"]), float(r["test_accuracy"]))
            for r in rows
            if isinstance(r.get("round"), int) and isinstance(r.get("test_accuracy"), int | float)
        ]
        curve = ([r for r, _ in pairs], [a for _, a in pairs])
        if key not in keyed:
            keyed[key] = Group("", config, [], [], [])
            configs.append(config)
        group = keyed[key]
        group.runs.append(run)
        group.seeds.append(seed)
        group.curves.append(curve)
    varying = [
        k
        for k in dict.fromkeys(k for c in configs for k in c)
        if len({_token(c.get(k)) for c in configs}) > 1
    ]
    for group in keyed.values():
        shown = varying or ["algorithm"]
        group.label = ", ".join(f"{k}={group.config.get(k, '-')}" for k in shown)
    return list(keyed.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{scale * mean:.{digits}f} +- {scale * std:.{digits}f}"


def _table(groups: Sequence[Group], target: float | None) -> list[dict[str, str]]:
    rows = []
    for g in groups:
        row = {
            "configuration": g.label,
            "seeds": str(len(g.runs)),
            "rounds": str(min((len(r) for r, _ in g.curves), default=0)),
            "final_accuracy_%": _pm(g.finals()),
            "best_accuracy_%": _pm(g.bests()),
        }
        if target is not None:
            reached = [float(r) for r in g.rounds_to(target) if r is not None]
            cell = _pm(reached, scale=1.0, digits=1) if reached else "never"
            if reached and len(reached) < len(g.runs):
                cell += f" ({len(reached)}/{len(g.runs)} reached)"
            row[f"rounds_to_{100 * target:g}%"] = cell
        rows.append(row)
    return rows


def format_compare(groups: Sequence[Group], *, target: float | None = None) -> str:
    """Return the comparison table as aligned text (mean +- std over seeds)."""
    rows = _table(groups, target)
    if not rows:
        return "no runs"
    heads = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in heads]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(heads, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_compare(
    groups: Sequence[Group], out_dir: Path, *, target: float | None = None
) -> tuple[Path, Path]:
    """Write ``compare.csv`` and ``compare.png`` into ``out_dir``.

    Returns:
        The two paths.
    """
    rows = _table(groups, target)
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    csv_path, png_path = out_dir / COMPARE_CSV, out_dir / COMPARE_PNG
    atomic_write_text(csv_path, text.getvalue())
    _plot(groups, png_path)
    return csv_path, png_path


def _plot(groups: Sequence[Group], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g in groups:
        by_round: dict[int, list[float]] = {}
        for rounds, accs in g.curves:
            for r, a in zip(rounds, accs, strict=True):
                by_round.setdefault(r, []).append(100.0 * a)
        if not by_round:
            continue
        xs = sorted(by_round)
        stats = [_mean_std(by_round[r]) for r in xs]
        mean = np.array([m for m, _ in stats])
        std = np.array([s for _, s in stats])
        (line,) = ax.plot(xs, mean, label=f"{g.label} (n={len(g.runs)})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), mean +- 1 std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    ax.set_title("emberfl compare")
    with name_os_errors(path):
        fig.savefig(os.fspath(path), format="png")
