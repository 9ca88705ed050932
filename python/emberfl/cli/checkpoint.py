"""Crash-safe checkpoints of an ``emberfl run``, and atomic file writes.

A checkpoint lives in ``RUN_DIR/checkpoint/``:

* ``model-round-NNNNNN.safetensors``: the global model's state dict after round ``NNNNNN``;
* ``state-round-NNNNNN.safetensors``: the algorithm's other state (server tensors such as
  momentum or control variates, and the client state store), for algorithms that have any;
* ``state.json``: the round, the names and SHA-256 of those tensor files, the
  configuration, the metrics so far, the server's generator states and the elapsed wall
  time.

Every file is written atomically (a temporary file in the same folder, ``fsync``, then
``os.replace`` and an ``fsync`` of the folder). The tensor file is written first under a
new name and ``state.json``, which points to it, last; older tensor files are deleted only
after that. A kill at any moment therefore leaves ``state.json`` naming a complete tensor
file: the previous checkpoint or the new one, never a torn mix. A save that fails (a full
disk) raises :class:`CheckpointSaveError` and removes the tensor files it had written, so
the folder holds the previous checkpoint and nothing else.

:func:`load_checkpoint` checks what it reads: the round is a whole number ``>= 0``, the
metrics hold exactly rounds ``1..round``, and the tensor files' SHA-256 and the round in
their headers match ``state.json``.

emberfl draws every random number from counter-based streams keyed by
``(seed, purpose, client, round)``, so resuming needs the round number and the global model,
not generator positions; the server's own generator states are saved anyway.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emberfl.atomic import atomic_write_bytes, atomic_write_text, read_tensor_file
from emberfl.errors import CheckpointError, EmberflError

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "STATE_FILE",
    "Checkpoint",
    "CheckpointSaveError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "load_model_file",
    "prepare_checkpoint_dir",
    "save_checkpoint",
    "save_model_file",
]

CHECKPOINT_DIR = "checkpoint"
"""The checkpoint folder inside a run directory."""
STATE_FILE = "state.json"
"""The checkpoint's JSON file."""
FORMAT = "emberfl-checkpoint"
"""The ``format`` tag of ``state.json``."""
VERSION = 1
"""The checkpoint format version this module writes and reads."""


@dataclass
class Checkpoint:
    """The state of a run after a round.

    Attributes:
        round: Rounds completed.
        model_state: The global model's state dict (CPU tensors).
        config: The run's configuration (as in ``config.toml``).
        metrics: One metrics row per completed round.
        rng: Generator states of the server (JSON-ready).
        wall_time_s: Seconds spent running so far.
        tensors: The algorithm's other state
            (:meth:`~emberfl.simulation.Simulation.state_tensors` without the model).
    """

    round: int
    model_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class CheckpointSaveError(EmberflError, OSError):
    """A checkpoint could not be written (full disk, unwritable folder); the previous one,
    if any, is still in place.

    Attributes:
        round: The round whose checkpoint failed.
        folder: The checkpoint folder.
        errno: The ``errno`` of the failure (``errno.ENOSPC`` for a full disk).
        strerror: The system's description of it.
        filename: The file being written.
    """

    def __init__(self, round_: int, folder: Path, cause: OSError) -> None:
        """Create the error.

        Args:
            round_: The round being saved.
            folder: The checkpoint folder.
            cause: The ``OSError`` that stopped the save.
        """
        why = cause.strerror or str(cause)
        self.message = f"could not save the round-{round_} checkpoint in {folder}: {why}"
        super().__init__(self.message)
        self.round = round_
        self.folder = folder
        self.errno = cause.errno
        self.strerror = cause.strerror
        self.filename = cause.filename

    def __str__(self) -> str:
        """Return the message (not ``OSError``'s ``[Errno N] ...`` form)."""
        return self.message


def _tensor_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    data: bytes = save(tensors, metadata=metadata)
    return data


def save_model_file(
    path: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save a state dict as a safetensors file, atomically.

    The bytes depend only on the tensors and ``metadata``, so equal models give equal files
    as long as ``metadata`` has at most one key (safetensors writes several keys in an
    arbitrary order).

    Args:
        path: The destination.
        state: The tensors (moved to the CPU).
        metadata: String metadata stored in the file's header.
    """
    atomic_write_bytes(path, _tensor_bytes(state, metadata or {}))


def load_model_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file written by :func:`save_model_file`.

    Args:
        path: The file.

    Returns:
        The state dict, on the CPU.

    Raises:
        CheckpointError: If the file is missing or not a valid safetensors file.
    """
    return read_tensor_file(path)


def save_checkpoint(run_dir: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``run_dir/checkpoint/``, crash-safely (see the module doc).

    Args:
        run_dir: The run directory.
        checkpoint: What to save.

    Returns:
        The path of ``state.json``.

    Raises:
        CheckpointSaveError: If the folder cannot be written or the disk is full (an
            ``OSError``); the previous checkpoint stays valid and the files this save had
            written are removed.
        CheckpointError: If ``checkpoint.round`` is not a whole number ``>= 0``.
    """
    round_ = checkpoint.round
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise CheckpointError(f"a checkpoint's round must be an integer >= 0, got {round_!r}")
    folder = Path(run_dir) / CHECKPOINT_DIR
    created: list[Path] = []
    try:
        return _save(folder, checkpoint, created)
    except BaseException as exc:  # a full disk, or a Ctrl-C mid-save
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError):
            raise CheckpointSaveError(round_, folder, exc) from exc
        raise


def _save(folder: Path, checkpoint: Checkpoint, created: list[Path]) -> Path:
    """Write the checkpoint's files, appending each new tensor file to ``created``."""
    folder.mkdir(parents=True, exist_ok=True)

    def write_new(name: str, blob: bytes) -> None:
        path = folder / name
        existed = path.exists()
        atomic_write_bytes(path, blob)
        if not existed:
            created.append(path)

    model_name = f"model-round-{checkpoint.round:06d}.safetensors"
    data = _tensor_bytes(checkpoint.model_state, {"round": str(checkpoint.round)})
    write_new(model_name, data)
    keep = {model_name}
    extra: dict[str, str] = {}
    if checkpoint.tensors:
        tensors_name = f"state-round-{checkpoint.round:06d}.safetensors"
        blob = _tensor_bytes(checkpoint.tensors, {"round": str(checkpoint.round)})
        write_new(tensors_name, blob)
        keep.add(tensors_name)
        extra = {"tensors_file": tensors_name, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    state = {
        "format": FORMAT,
        "version": VERSION,
        "round": checkpoint.round,
        "model_file": model_name,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "wall_time_s": checkpoint.wall_time_s,
        "config": checkpoint.config,
        "rng": checkpoint.rng,
        "metrics": checkpoint.metrics,
        **extra,
    }
    state_path = folder / STATE_FILE
    atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")
    created.clear()  # state.json names them now: they are the checkpoint
    for pattern in ("model-round-*.safetensors", "state-round-*.safetensors"):
        for old in folder.glob(pattern):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()
    return state_path


def prepare_checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Create ``run_dir/checkpoint/`` if needed and check that files can be written in it.

    Run before training, so that a checkpoint folder that cannot be used fails the run at
    once rather than after its first checkpointed round.

    Args:
        run_dir: The run directory (it must exist).

    Returns:
        The checkpoint folder.

    Raises:
        OSError: If the folder cannot be created or written, with ``filename`` naming it
            (``FileExistsError`` / ``NotADirectoryError`` when a file is in its place).
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, "a file is in the way of the folder", str(folder))
    folder.mkdir(exist_ok=True)
    atomic_write_bytes(folder / ".emberfl-write-test", b"")
    (folder / ".emberfl-write-test").unlink()
    return folder


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt ({what}); delete {path.parent} to restart the run "
        "from round 0"
    )


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """Read the checkpoint of ``run_dir``.

    Args:
        run_dir: The run directory.

    Returns:
        The checkpoint, or ``None`` if the run has none yet.

    Raises:
        CheckpointError: If ``state.json`` or the tensor file is corrupt, missing or of
            another format; the message says which file and what to do.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    state_path = folder / STATE_FILE
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(state_path, f"unreadable JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _corrupt(state_path, f"not an {FORMAT} file")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {state_path} has format version {state.get('version')!r}, but this "
            f"emberfl reads version {VERSION}; resume it with the emberfl that wrote it"
        )
    try:
        round_ = state["round"]
        model_file = str(state["model_file"])
        digest = str(state["model_sha256"])
        config = dict(state["config"])
        metrics = [dict(row) for row in state["metrics"]]
        rng = dict(state.get("rng", {}))
        wall_time_s = float(state.get("wall_time_s", 0.0))
        tensors_file = state.get("tensors_file")
        tensors_digest = state.get("tensors_sha256")
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(state_path, f"missing or malformed field {exc}") from None
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        what = f"{round_!r} ({type(round_).__name__})"
        raise _corrupt(state_path, f"its round must be an integer >= 0, got {what}")
    logged = [row.get("round") for row in metrics]
    if logged != list(range(1, round_ + 1)):
        shown = logged if len(logged) <= 6 else [*logged[:3], "...", *logged[-2:]]
        raise _corrupt(
            state_path,
            f"round {round_}, but its metrics hold rounds {shown} (expected 1..{round_})",
        )
    model_state = _read_tensor_file(folder, model_file, digest, round_)
    tensors: dict[str, torch.Tensor] = {}
    if tensors_file is not None:
        tensors = _read_tensor_file(folder, str(tensors_file), str(tensors_digest), round_)
    return Checkpoint(
        round=round_,
        model_state=model_state,
        config=config,
        metrics=metrics,
        rng=rng,
        wall_time_s=wall_time_s,
        tensors=tensors,
    )


def _header_round(data: bytes) -> object:
    """The ``round`` of a safetensors file's metadata (``None`` if it has none)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    return metadata.get("round")


def _read_tensor_file(folder: Path, name: str, digest: str, round_: int) -> dict[str, torch.Tensor]:
    """Read a tensor file ``state.json`` names, checking its name, SHA-256 and round."""
    from safetensors.torch import load

    path = folder / name
    if "/" in name or "\\" in name:
        raise _corrupt(folder / STATE_FILE, f"the file name {name!r} has a folder in it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _corrupt(path, f"cannot read it: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _corrupt(path, "its SHA-256 does not match state.json")
    try:
        tensors: dict[str, torch.Tensor] = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _corrupt(path, f"not a valid safetensors file: {exc}") from None
    written_for = _header_round(data)
    if written_for != str(round_):
        raise _corrupt(
            path, f"it was written for round {written_for}, but state.json says round {round_}"
        )
    return tensors
