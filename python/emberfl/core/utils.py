"""BlazeFL's ``blazefl.core.utils`` module path, kept so ported imports keep working.

The functions live in :mod:`emberfl.core.serialization` and
:mod:`emberfl.core.shared_memory`; import them from :mod:`emberfl.core` in new code.
"""

from __future__ import annotations

from emberfl.core.serialization import deserialize_model, serialize_model
from emberfl.core.shared_memory import (
    SHMHandle,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
)

__all__ = [
    "SHMHandle",
    "deserialize_model",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "serialize_model",
]
