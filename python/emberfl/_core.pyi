"""Type stubs of the Rust extension ``emberfl._core``."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Arena",
    "Stream",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "median",
    "norms",
    "pairwise_sq_dists",
    "philox4x32_10",
    "philox4x64_10",
    "trimmed_mean",
    "weighted_mean",
]

_HandleTuple = tuple[str, int, int, str, int, int, int, int]
_StateTuple = tuple[int, int, int, int, int, int, int, bool, int]

def philox4x64_10(
    counter: tuple[int, int, int, int] | list[int], key: tuple[int, int] | list[int]
) -> list[int]: ...
def philox4x32_10(
    counter: tuple[int, int, int, int] | list[int], key: tuple[int, int] | list[int]
) -> list[int]: ...

@final
class Stream:
    def __new__(cls, seed: int, *, purpose: int = 0, client: int = 0, round: int = 0) -> Stream: ...
    def random_raw(self, n: int) -> npt.NDArray[np.uint64]: ...
    def random(self, n: int) -> npt.NDArray[np.float64]: ...
    def normal(self, n: int) -> npt.NDArray[np.float64]: ...
    def integers(self, low: int, high: int, n: int) -> npt.NDArray[np.int64]: ...
    def permutation(self, n: int) -> npt.NDArray[np.int64]: ...
    def choice(self, n: int, k: int) -> npt.NDArray[np.int64]: ...
    def torch_seed(self) -> int: ...
    def state(self) -> _StateTuple: ...
    @staticmethod
    def from_state(state: _StateTuple) -> Stream: ...
    def copy(self) -> Stream: ...
    def __reduce__(self) -> tuple[Any, tuple[_StateTuple]]: ...

@final
class Arena:
    @staticmethod
    def create(
        num_slots: int, dim: int, *, backing: str = "memfd", shm_dir: str | None = None
    ) -> Arena: ...
    @staticmethod
    def attach(handle: _HandleTuple) -> Arena: ...
    def handle(self) -> _HandleTuple: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def data_address(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def fd(self) -> int: ...
    def unlink(self) -> None: ...
    def copy_slot(self, src: int, dst: int) -> None: ...

def weighted_mean(
    arena: Arena,
    slots: list[int],
    weights: list[float],
    out: int | npt.NDArray[np.float32],
    *,
    num_threads: int,
) -> None: ...
def median(
    arena: Arena, slots: list[int], out: int | npt.NDArray[np.float32], *, num_threads: int
) -> None: ...
def trimmed_mean(
    arena: Arena,
    slots: list[int],
    out: int | npt.NDArray[np.float32],
    beta: float,
    *,
    num_threads: int,
) -> None: ...
def norms(arena: Arena, slots: list[int], *, num_threads: int) -> npt.NDArray[np.float64]: ...
def pairwise_sq_dists(
    arena: Arena, slots: list[int], *, num_threads: int
) -> npt.NDArray[np.float64]: ...
def max_pool2d_forward(
    input: npt.NDArray[np.float32],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    out: npt.NDArray[np.float32],
    argmax: npt.NDArray[np.uint8],
    *,
    num_threads: int,
) -> None: ...
def max_pool2d_backward(
    grad_out: npt.NDArray[np.float32],
    argmax: npt.NDArray[np.uint8],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    grad_in: npt.NDArray[np.float32],
    *,
    num_threads: int,
) -> None: ...
