"""Pin PyTorch's intra-op thread count while clients train.

PyTorch's intra-op thread count is one process-wide setting (``torch.set_num_threads``),
and a CPU reduction's result depends on how many threads split it. emberfl therefore
trains every client with the same count (one thread by default) in every execution mode:
serial and thread-pool trainers set it for the duration of ``local_process`` and restore
the caller's value afterwards; process-pool workers set it once in their own process. In
thread-pool mode the setting is shared by all worker threads (and by any other thread of
the program that runs PyTorch code meanwhile), which is why it is set around the whole
pool rather than per thread: ``P`` parallel clients then use ``P`` cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["intra_op_threads"]


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(num_threads)``, then restore the old value.

    Args:
        num_threads: The intra-op thread count, or ``None`` to leave PyTorch's setting
            alone (results may then differ between execution modes).

    Yields:
        Nothing.

    Raises:
        ValueError: If ``num_threads`` is smaller than 1.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1 or None, got {num_threads}")
    previous = torch.get_num_threads()
    if previous == num_threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
