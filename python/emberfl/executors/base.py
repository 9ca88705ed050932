"""What every executor shares: the clients' setup, a round's plan and the result contract.

An executor runs one round's clients of any :class:`~emberfl.algorithms.Algorithm` and
hands each :class:`~emberfl.algorithms.ClientResult` to a ``consume(position, cid,
result)`` callback **in the order of the round's client list**, whatever order the
clients finish in. A result's tensors may be views of the executor's shared memory: they
are valid only until ``consume`` returns, so the caller folds them into its sums there and
keeps nothing. Between them, this contract and :class:`~emberfl.aggregation.WeightedSum`
keep a round's memory proportional to the parallelism, not to the number of clients.
"""

from __future__ import annotations

import copy
import math
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from emberfl.algorithms.base import (
    Algorithm,
    Client,
    ClientResult,
    ModelLayout,
    Split,
    StreamSpec,
)
from emberfl.errors import ClientError, ConfigError, PayloadWriteError, TensorMismatchError
from emberfl.state_store import ClientStateStore

__all__ = [
    "ClientSetup",
    "Consume",
    "Executor",
    "RoundPlan",
    "as_client_error",
    "check_positive_int",
    "check_result",
]

Consume = Callable[[int, int, ClientResult], None]
"""``consume(position, cid, result)``: called once per client, in client-list order."""


@dataclass
class ClientSetup:
    """What the clients of a federation share: data, model, batch size, seed, device.

    Attributes:
        dataset: A partitioned data set (:class:`~emberfl.core.PartitionedDataset`:
            ``get_dataset`` and ``get_dataloader(type_, cid, batch_size, generator)`` with
            a ``"train"`` split per client).
        model: The model; its architecture (and, for the server, its initial values).
        batch_size: Local batch size.
        seed: The experiment seed; client ``k``'s randomness in round ``r`` is the stream
            ``(seed, CLIENT_TRAINING, k, r)``.
        device: Where clients train (``"cpu"``, ``"cuda"`` or ``"cuda:N"``).
        fast_layers: Train with emberfl's bitwise-equivalent CPU kernels
            (:func:`emberfl.nn.use_fast_layers`).
    """

    dataset: Any
    model: nn.Module
    batch_size: int
    seed: int
    device: str = "cpu"
    fast_layers: bool = True

    def __post_init__(self) -> None:
        """Check the batch size and seed."""
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"seed must fit in 64 bits, got {self.seed}")

    def template(self) -> nn.Module:
        """Return a private copy of the model for training (fast layers swapped in)."""
        from emberfl.nn import use_fast_layers

        model = copy.deepcopy(self.model)
        if self.fast_layers:
            use_fast_layers(model)
        return model

    def num_samples(self, cid: int) -> int:
        """Return client ``cid``'s number of training samples."""
        data = self.dataset.get_dataset(Split.TRAIN, cid)
        return len(data) if isinstance(data, Sized) else 0

    def loader_factory(self, cid: int) -> Callable[[Split, torch.Generator], DataLoader[Any]]:
        """Return ``(split, generator) -> DataLoader`` over client ``cid``'s data."""
        dataset, batch_size = self.dataset, self.batch_size

        def make(split: Split, generator: torch.Generator) -> DataLoader[Any]:
            loader: DataLoader[Any] = dataset.get_dataloader(
                split, cid, batch_size=batch_size, generator=generator
            )
            return loader

        return make


@dataclass
class RoundPlan:
    """One round's work, as the simulation hands it to an executor.

    Attributes:
        algorithm: The algorithm.
        broadcast: What the server sends (flat CPU tensors).
        cids: The round's clients, in order.
        round: The round (0-based).
        layout: The model's flat layout.
        streams: The algorithm's uplink streams.
        state: The client state store (``None``: the algorithm keeps no client state).
    """

    algorithm: Algorithm
    broadcast: dict[str, torch.Tensor]
    cids: list[int]
    round: int
    layout: ModelLayout
    streams: dict[str, StreamSpec]
    state: ClientStateStore | None = None


def check_positive_int(name: str, value: object) -> None:
    """Raise :class:`~emberfl.errors.ConfigError` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_timeout(name: str, value: object) -> float | None:
    """Return ``value`` as seconds (``None`` stays ``None``) or raise ``ConfigError``."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def as_client_error(cid: int, exc: BaseException) -> ClientError:
    """Wrap ``exc`` raised while client ``cid`` trained (keeping its traceback)."""
    if isinstance(exc, ClientError):
        return exc
    error = ClientError(
        cid, f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc))
    )
    error.__cause__ = exc
    return error


BroadcastMarks = dict[str, tuple[torch.Tensor, int, torch.Tensor]]
"""Each broadcast tensor, its in-place version counter and a private copy of its values."""


def broadcast_marks(broadcast: dict[str, torch.Tensor]) -> BroadcastMarks:
    """Remember the broadcast as the round starts (see :func:`check_broadcast`)."""
    return {name: (t, t._version, t.detach().clone()) for name, t in broadcast.items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_broadcast(
    broadcast: dict[str, torch.Tensor],
    marks: BroadcastMarks,
    cid: int,
    running: dict[int, float] | None = None,
) -> None:
    """Raise if a client wrote into the broadcast, after putting the values back.

    Every client of a round starts from the same broadcast, which the in-process modes
    share between clients: a client that writes into it would change what later clients
    (and, in thread mode, clients training beside it) start from.

    Args:
        broadcast: The round's broadcast.
        marks: :func:`broadcast_marks` of it, taken before any client ran.
        cid: The client that just finished.
        running: Clients still training (thread mode), named as possible writers.

    Raises:
        PayloadWriteError: A broadcast tensor's values (or version counter) changed.
    """
    for name, (tensor, version, values) in marks.items():
        if (
            broadcast.get(name) is tensor
            and tensor._version == version
            and _same_bits(tensor, values)
        ):
            continue
        broadcast[name] = tensor  # the entry itself may have been replaced
        with torch.no_grad():
            tensor.copy_(values)
        marks[name] = (tensor, tensor._version, values)
        others = sorted(c for c in (running or {}) if c != cid)
        who = f" (or client {', '.join(map(str, others))}, training beside it)" if others else ""
        raise PayloadWriteError(
            cid,
            f"wrote into the round's broadcast {name!r}{who}, which every client of the "
            "round starts from; its values were restored. Copy a broadcast tensor before "
            "changing it (tensor.clone())",
        )


def check_result(result: object, plan: RoundPlan, cid: int) -> ClientResult:
    """Check a client's result against the declared streams.

    Args:
        result: What ``client_update`` returned.
        plan: The round.
        cid: The client.

    Returns:
        The result.

    Raises:
        TensorMismatchError: A missing, unexpected or misshapen stream; the message names
            the client, the stream and the expected size.
    """
    name = type(plan.algorithm).__name__
    if not isinstance(result, ClientResult):
        raise TensorMismatchError(
            f"client {cid}: {name}.client_update returned a {type(result).__name__}, not a "
            "ClientResult"
        )
    missing = [s for s in plan.streams if s not in result.uplink]
    extra = [s for s in result.uplink if s not in plan.streams]
    if missing or extra:
        raise TensorMismatchError(
            f"client {cid}: {name} declared uplink streams {sorted(plan.streams)} but the client "
            f"sent {sorted(result.uplink)}"
        )
    for stream_name, spec in plan.streams.items():
        t = result.uplink[stream_name]
        if not isinstance(t, torch.Tensor) or t.numel() != spec.dim or not t.is_floating_point():
            got = (
                f"a {t.dtype} tensor of shape {tuple(t.shape)}"
                if isinstance(t, torch.Tensor)
                else f"a {type(t).__name__}"
            )
            hint = (
                f" (the model's flat layout: {plan.layout.describe()})"
                if spec.dim == plan.layout.dim
                else ""
            )
            raise TensorMismatchError(
                f"client {cid} sent uplink {stream_name!r} as {got}; {name} declares "
                f"{spec.dim} floating-point values{hint}"
            )
    return result


class Executor(ABC):
    """Runs a round's clients of any algorithm (see the module docstring for the contract).

    Attributes:
        name: The mode's name (``"serial"``, ``"thread"``, ``"process"``, ``"vectorized"``).
        setup: The clients' setup.
        intra_op_threads: PyTorch's intra-op thread count while clients train (``None``:
            leave it). One per client keeps results independent of the machine's load and
            lets ``num_parallels`` clients share the cores.
    """

    name: ClassVar[str] = "executor"

    def __init__(
        self,
        setup: ClientSetup,
        *,
        intra_op_threads: int | None = 1,
        client_timeout: float | None = None,
    ) -> None:
        """Create the executor.

        Args:
            setup: The clients' data, model, batch size, seed and device.
            intra_op_threads: PyTorch's intra-op thread count while clients train.
            client_timeout: Seconds a client may train before the round fails with a
                :class:`~emberfl.errors.ClientTimeoutError` (``None``: no limit).

        Raises:
            ConfigError: A ``client_timeout`` that is not a positive number.
        """
        self.setup = setup
        self.intra_op_threads = intra_op_threads
        self.client_timeout = check_timeout("client_timeout", client_timeout)
        self.stop_event = threading.Event()

    @property
    def parallelism(self) -> int:
        """Clients (or chunks) trained at once."""
        return 1

    @abstractmethod
    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` and call ``consume`` for each, in order.

        Args:
            plan: The round.
            consume: The callback; a result's tensors are valid until it returns.

        Raises:
            ClientError: A client's computation raised (it names the client).
            TensorMismatchError: A client's uplink does not match the declared streams.
        """

    def client(
        self,
        plan: RoundPlan,
        cid: int,
        model: nn.Module,
        *,
        state: dict[str, torch.Tensor] | None = None,
        state_is_new: bool = True,
        stop_event: Any = None,
    ) -> Client:
        """Build client ``cid``'s view for ``plan`` (used by the per-client executors)."""
        if state is None:
            state = plan.state.views(cid) if plan.state is not None else {}
            state_is_new = plan.state is None or not plan.state.is_written(cid)
        return Client(
            cid=cid,
            round=plan.round,
            seed=self.setup.seed,
            device=self.setup.device,
            model=model,
            layout=plan.layout,
            broadcast=plan.broadcast,
            state=state,
            state_is_new=state_is_new,
            loader_factory=self.setup.loader_factory(cid),
            num_samples=self.setup.num_samples(cid),
            stop_event=self.stop_event if stop_event is None else stop_event,
        )

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release the executor's resources (worker processes, memory). Idempotent."""

    def __enter__(self) -> Executor:
        """Return the executor; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()
