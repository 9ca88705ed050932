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
file: the previous checkpoint or the new one, never a torn mix.

emberfl draws every random number from counter-based streams keyed by
``(seed, purpose, client, round)``, so resuming needs the round number and the global model,
not generator positions; the server's own generator states are saved anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emberfl.atomic import atomic_write_bytes, atomic_write_text, read_tensor_file
from emberfl.errors import CheckpointError

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "STATE_FILE",
    "Checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "load_model_file",
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
        OSError: If the folder cannot be written; the previous checkpoint stays valid.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    model_name = f"model-round-{checkpoint.round:06d}.safetensors"
    data = _tensor_bytes(checkpoint.model_state, {"round": str(checkpoint.round)})
    atomic_write_bytes(folder / model_name, data)
    keep = {model_name}
    extra: dict[str, str] = {}
    if checkpoint.tensors:
        tensors_name = f"state-round-{checkpoint.round:06d}.safetensors"
        blob = _tensor_bytes(checkpoint.tensors, {"round": str(checkpoint.round)})
        atomic_write_bytes(folder / tensors_name, blob)
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
    for pattern in ("model-round-*.safetensors", "state-round-*.safetensors"):
        for old in folder.glob(pattern):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()
    return state_path


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
        round_ = int(state["round"])
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
    if round_ < 0 or len(metrics) != round_:
        raise _corrupt(state_path, "inconsistent round and metrics")
    model_state = _read_tensor_file(folder, model_file, digest)
    tensors: dict[str, torch.Tensor] = {}
    if tensors_file is not None:
        tensors = _read_tensor_file(folder, str(tensors_file), str(tensors_digest))
    return Checkpoint(
        round=round_,
        model_state=model_state,
        config=config,
        metrics=metrics,
        rng=rng,
        wall_time_s=wall_time_s,
        tensors=tensors,
    )


def _read_tensor_file(folder: Path, name: str, digest: str) -> dict[str, torch.Tensor]:
    """Read a tensor file ``state.json`` names, checking its name and SHA-256."""
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
    return tensors
