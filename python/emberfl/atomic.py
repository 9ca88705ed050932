"""Crash-safe file writes, and reading the tensor files emberfl writes.

:func:`atomic_write_bytes` writes a temporary file in the destination's folder, ``fsync``s
it, renames it over the destination and ``fsync``s the folder: readers (and a run resumed
after a kill) see the old file or the new one, never a part of either. A failed write
(a full disk, a folder that is not writable) leaves the old file as it was and no
temporary file behind.

Every file is created with mode ``0o666 & ~umask``, as :func:`open` creates files (not the
``0o600`` of :func:`tempfile.mkstemp`), and an ``OSError`` raised while writing names the
destination in its ``filename`` (a write cut short by a full disk names no file otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch

from emberfl.errors import CheckpointError

__all__ = [
    "append_text",
    "atomic_write_bytes",
    "atomic_write_text",
    "name_os_errors",
    "read_tensor_file",
]

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def name_os_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Make an ``OSError`` raised inside the block that names no file name ``path``.

    Args:
        path: The file the block reads or writes.

    Yields:
        Nothing.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every file system supports it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temp(dest: Path) -> tuple[int, Path]:
    """Create ``.NAME.<random>.tmp`` next to ``dest``, mode ``0o666 & ~umask``."""
    for _ in range(100):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", os.fspath(dest))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Args:
        path: The destination (its folder must exist).
        data: The content.

    Raises:
        OSError: If the folder is not writable or the disk is full, with ``filename`` set
            to ``path``; the destination is left untouched and the temporary file removed.
    """
    dest = Path(path)
    try:
        fd, tmp = _create_temp(dest)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        # Name the destination, not the temporary file (nor nothing, as a short write does).
        exc.filename, exc.filename2 = os.fspath(dest), None
        raise
    _fsync_dir(dest.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` atomically; see :func:`atomic_write_bytes`.

    Args:
        path: The destination.
        text: The content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append UTF-8 ``text`` to ``path`` (created if missing) and flush it.

    Not atomic: a kill or a full disk can leave the last line cut short, so readers of an
    appended file must skip a broken last line.

    Args:
        path: The file.
        text: The content to add.

    Raises:
        OSError: If the file cannot be written, with ``filename`` set to ``path``.
    """
    with name_os_errors(path), open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()


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
