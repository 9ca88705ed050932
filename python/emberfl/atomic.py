"""Crash-safe file writes, and reading the tensor files emberfl writes.

:func:`atomic_write_bytes` writes a temporary file in the destination's folder, ``fsync``s
it, renames it over the destination and ``fsync``s the folder: readers (and a run resumed
after a kill) see the old file or the new one, never a part of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from emberfl.errors import CheckpointError

__all__ = ["atomic_write_bytes", "atomic_write_text", "read_tensor_file"]


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every file system supports it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Args:
        path: The destination (its folder must exist).
        data: The content.

    Raises:
        OSError: If the folder is not writable or the disk is full; the destination is
            left untouched and the temporary file removed.
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` atomically; see :func:`atomic_write_bytes`.

    Args:
        path: The destination.
        text: The content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def read_tensor_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file.

    Args:
        path: The file.

    Returns:
        Its tensors, on the CPU.

    Raises:
        CheckpointError: If the file is missing, unreadable or not a valid safetensors file.
    """
    from safetensors.torch import load

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        tensors: dict[str, torch.Tensor] = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{p} is not a valid safetensors file ({exc})") from None
    return tensors
