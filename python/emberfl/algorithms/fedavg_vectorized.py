"""FedAvg with vectorized clients: ``chunk_size`` clients trained at once on one device.

:class:`FedAvgVectorizedClientTrainer` is a drop-in replacement for the serial
:class:`~emberfl.algorithms.FedAvgBaseClientTrainer` (same constructor arguments, plus
``chunk_size`` and SGD options) built on :mod:`emberfl.core.vectorized`:

* each client reads its own mini-batches in the order of its own stream
  (:func:`emberfl.reproducibility.client_rng_suite` ``(seed, cid, round)``), from the very
  loader the serial trainer would build, so the clients see exactly the serial order;
* clients with fewer samples or steps are padded and masked: a client is never updated on
  a step it does not have, and a short last batch averages its loss over its real samples;
* the result is the per-client serial result up to floating-point rounding (batched
  kernels sum in another order; about 1e-6 relative after a round), deterministic from
  run to run, and independent of ``chunk_size`` up to the same rounding.

Each round's client models live in the slots of a fresh :class:`~emberfl.arena.ParamArena`
while they train (on the CPU; elsewhere they are copied there after each chunk): the first
local step reads the global model through stride-0 views and writes each client's slot,
later steps update the slots in place, and every uplink package's ``model_parameters`` is
a view of its slot. :class:`FedAvgBaseServerHandler` copies them into its own arena as usual;
:class:`FedAvgVectorizedServerHandler` notices that they already live in one arena and
runs the Rust :func:`~emberfl.aggregation.weighted_mean` on it in place, with no copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from emberfl.algorithms.fedavg import (
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgPartitionType,
    FedAvgUplinkPackage,
)
from emberfl.arena import ParamArena
from emberfl.core import BaseClientTrainer, ModelSelector, deserialize_model, intra_op_threads
from emberfl.core.batches import iter_batches
from emberfl.core.heap import retain_freed_memory
from emberfl.core.vectorized import ConvMode, StackedSGD, VectorizedModel, stack_batches
from emberfl.errors import ClientError, ConfigError
from emberfl.reproducibility import client_rng_suite

__all__ = [
    "FedAvgVectorizedClientTrainer",
    "FedAvgVectorizedServerHandler",
    "FedAvgVectorizedUplinkPackage",
    "default_chunk_size",
]


@dataclass
class FedAvgVectorizedUplinkPackage(FedAvgUplinkPackage):
    """A :class:`FedAvgUplinkPackage` whose parameters are a view of an arena slot.

    Attributes:
        arena: The arena holding ``model_parameters`` (``None`` if it was copied out).
        slot: The slot index inside ``arena``.
    """

    arena: ParamArena | None = field(default=None, repr=False, compare=False)
    slot: int = -1


DEFAULT_CPU_CHUNK = 32
"""The most clients at once on the CPU when ``chunk_size`` is ``None`` (the whole round
elsewhere). The round is split into equal chunks of at most this many clients, and into a
multiple of ``num_parallels`` chunks so that the threads get equal work
(:func:`default_chunk_size`; ``benches/bench_vectorized.py`` measures the scaling)."""


def default_chunk_size(num_clients: int, num_parallels: int, limit: int = DEFAULT_CPU_CHUNK) -> int:
    """Return the CPU chunk size used when ``chunk_size`` is ``None``.

    Args:
        num_clients: Clients in the round (>= 1).
        num_parallels: Chunks trained at once.
        limit: The largest chunk.

    Returns:
        ``ceil(num_clients / k)`` for the smallest ``k`` that is a multiple of
        ``num_parallels`` and gives chunks of at most ``limit`` clients (for example
        100 clients, 2 threads: 4 chunks of 25).
    """
    chunks = -(-num_clients // limit)
    chunks = -(-chunks // num_parallels) * num_parallels
    return max(1, -(-num_clients // chunks))


def _client_batches(loader: DataLoader[Any], epochs: int) -> Iterator[Any]:
    """Yield the batches of ``epochs`` passes over ``loader``, in the loader's order."""
    for _ in range(epochs):
        yield from iter_batches(loader)


class FedAvgVectorizedClientTrainer(BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """FedAvg clients trained ``chunk_size`` at a time as one stacked model.

    Attributes:
        model: The local model (the architecture; its values are never used).
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        seed: The experiment seed.
        chunk_size: Clients trained at once (``None``: :func:`default_chunk_size` on the
            CPU, every client of the round elsewhere).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2 penalty).
        dampening: SGD dampening.
        nesterov: Nesterov momentum.
        num_parallels: Chunks trained at once (threads).
        round: Number of ``local_process`` calls completed (the client streams' round).
        cache: Packages waiting for :meth:`uplink_package`.
        intra_op_threads: PyTorch's intra-op thread count while training (``None``: leave).
        retain_memory: Keep freed CPU memory in the heap between steps.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        *,
        chunk_size: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        num_parallels: int = 1,
        intra_op_threads: int | None = 1,
        conv: ConvMode = "auto",
        retain_memory: bool = True,
    ) -> None:
        """Create the trainer.

        Args:
            model_selector: Builds the local model.
            model_name: Which model.
            dataset: The partitioned data set.
            device: Where to train.
            num_clients: Number of clients.
            epochs: Local epochs.
            batch_size: Local batch size.
            lr: SGD learning rate.
            seed: The experiment seed.
            chunk_size: Clients trained at once (>= 1); bounds memory to about
                ``chunk_size`` models, optimiser states and mini-batches. ``None``:
                :func:`default_chunk_size` on the CPU, every client of a round elsewhere.
            momentum: SGD momentum (``torch.optim.SGD``'s meaning; 0 is the serial
                trainer's plain SGD).
            weight_decay: SGD weight decay.
            dampening: SGD dampening.
            nesterov: Nesterov momentum.
            num_parallels: Chunks trained at once, each in its own thread (the batched
                kernels release the GIL); the result does not depend on it.
            intra_op_threads: PyTorch's intra-op thread count while training. Keep it
                at 1 and raise ``num_parallels`` to use more cores: many small parallel
                regions slow down badly when other processes share the cores.
            conv: How per-client convolutions run (:data:`~emberfl.core.vectorized.ConvMode`).
            retain_memory: On the CPU, keep freed memory in the process heap between
                steps (:func:`emberfl.core.heap.retain_freed_memory`: process-wide, glibc
                only) instead of page-faulting the chunk's large tensors in again on every
                step.

        Raises:
            ConfigError: For ``chunk_size <= 0``, ``num_parallels <= 0``, a bad optimiser
                setting or a model
                vectorized training does not support (the message names the layer).
        """
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size <= 0):
            raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        if isinstance(num_parallels, bool) or num_parallels <= 0:
            raise ConfigError(f"num_parallels must be a positive integer, got {num_parallels}")
        if epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {epochs}")
        self.model = model_selector.select_model(model_name)
        self.dataset = dataset
        self.device = device
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.chunk_size = chunk_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.dampening = dampening
        self.nesterov = nesterov
        self.num_parallels = num_parallels
        self.intra_op_threads = intra_op_threads
        self.retain_memory = retain_memory
        self.round = 0
        self.cache: list[FedAvgUplinkPackage] = []
        self._vmodel = VectorizedModel(self.model, conv=conv, device=device)
        StackedSGD(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )  # validates the options now
        self._stop = threading.Event()
        self._replicas = [self._vmodel]
        self._arena: ParamArena | None = None

    def client_loader(self, cid: int) -> DataLoader[Any]:
        """Return client ``cid``'s loader for the current round (the serial trainer's).

        Args:
            cid: The client id.

        Returns:
            The loader, shuffled by the client's own generator.
        """
        rng = client_rng_suite(self.seed, cid, self.round)
        return self.dataset.get_dataloader(
            type_=FedAvgPartitionType.TRAIN,
            cid=cid,
            batch_size=self.batch_size,
            generator=rng.torch_cpu,
        )

    def local_process(self, payload: FedAvgDownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list``, ``chunk_size`` clients at a time.

        Args:
            payload: The global model.
            cid_list: The clients of this round.

        Raises:
            TensorMismatchError: If the global model does not have the local model's
                layout.
            ClientError: If training a chunk raised (it names the chunk's first client and
                lists the others; nothing is cached).
        """
        if not cid_list:
            self.round += 1
            return
        global_flat = payload.model_parameters.detach().reshape(-1).to(torch.float32)
        self._vmodel.stack(global_flat, 1)  # validates the layout before any work
        # A fresh arena per round: packages handed out earlier keep theirs alive.
        self.close()
        arena = ParamArena.from_model(self.model, len(cid_list))
        self._arena = arena
        on_cpu = self._vmodel.device.type == "cpu"
        chunk = self.chunk_size or (
            default_chunk_size(len(cid_list), self.num_parallels) if on_cpu else len(cid_list)
        )
        if on_cpu and self.retain_memory:
            retain_freed_memory()
        starts = list(range(0, len(cid_list), chunk))
        workers = min(self.num_parallels, len(starts))
        while len(self._replicas) < workers:
            self._replicas.append(self._vmodel.replica())
        free: queue.SimpleQueue[VectorizedModel] = queue.SimpleQueue()
        for vmodel in self._replicas[:workers]:
            vmodel.load_shared(global_flat)
            free.put(vmodel)
        self._stop.clear()

        def train(start: int) -> list[int]:
            cids = cid_list[start : start + chunk]
            vmodel = free.get()
            try:
                return self._train_chunk(vmodel, global_flat, cids, arena, start)
            except Exception as exc:
                self._stop.set()
                others = f" (chunk of clients {cids})" if len(cids) > 1 else ""
                raise ClientError(cids[0], f"{type(exc).__name__}: {exc}{others}") from exc
            finally:
                free.put(vmodel)

        with intra_op_threads(self.intra_op_threads):
            if workers == 1:
                per_chunk = [train(start) for start in starts]
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="emberfl-chunk") as pool:
                    futures = [pool.submit(train, start) for start in starts]
                    per_chunk = [f.result() for f in futures]  # first failure, in order
        sizes = [size for chunk_sizes in per_chunk for size in chunk_sizes]
        self.cache.extend(
            FedAvgVectorizedUplinkPackage(cid, arena.slot(i), size, None, arena=arena, slot=i)
            for i, (cid, size) in enumerate(zip(cid_list, sizes, strict=True))
        )
        self.round += 1

    def _train_chunk(
        self,
        vmodel: VectorizedModel,
        global_flat: torch.Tensor,
        cids: list[int],
        arena: ParamArena,
        start: int,
    ) -> list[int]:
        loaders = [self.client_loader(cid) for cid in cids]
        sizes = [len(ld.dataset) if isinstance(ld.dataset, Sized) else 0 for ld in loaders]
        streams: list[Iterator[Any] | None] = [_client_batches(ld, self.epochs) for ld in loaders]
        # The clients' parameters live in their arena slots (on the CPU): the first step
        # reads the global model through stride-0 views and writes the slots, later steps
        # update the slots in place, and the server reads them from there.
        rows = _rows(arena, start, len(cids))
        flat = global_flat.to(vmodel.device)
        current = vmodel.broadcast(flat, len(cids))
        if vmodel.device.type == "cpu":
            params = vmodel.row_views(rows)
        else:
            params = {n: torch.empty_like(t) for n, t in current.items()}
        first = True
        sgd = StackedSGD(
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )
        while not self._stop.is_set():
            batches: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for i, it in enumerate(streams):
                batch = None if it is None else next(it, None)
                if batch is None:
                    streams[i] = None
                    batches.append(None)
                else:
                    data, target = batch
                    batches.append((data, target))
            if all(b is None or b[0].shape[0] == 0 for b in batches):
                break
            inputs, targets, weights, active = stack_batches(batches, vmodel.device)
            grads = vmodel.grads(current, inputs, targets, weights)
            active_or_all = None if bool(active.all()) else active
            sgd.step(params, grads, active_or_all, source=current if first else None)
            current, first = params, False
        # Untrained entries (buffers, frozen parameters) and, off the CPU, everything.
        vmodel.write_rows(rows, current, flat, trained=vmodel.device.type != "cpu" or first)
        return sizes

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return (and clear) the cached packages (views of this round's arena slots)."""
        package, self.cache = self.cache, []
        return package

    def close(self) -> None:
        """Drop this trainer's reference to the current arena (packages keep theirs)."""
        self._arena = None

    def __enter__(self) -> FedAvgVectorizedClientTrainer:
        """Return the trainer; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


class FedAvgVectorizedServerHandler(FedAvgBaseServerHandler):
    """The FedAvg server, aggregating a vectorized trainer's packages in place.

    When every package of a round is a :class:`FedAvgVectorizedUplinkPackage` whose
    parameters are still the view of its slot in one shared arena, the weighted mean runs
    on that arena directly (no copy into the server's arena). Otherwise, or for other
    packages, it behaves exactly like :class:`FedAvgBaseServerHandler`. Both paths give
    bitwise-identical models.
    """

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        """Replace the global model with the data-size-weighted mean of ``buffer``.

        Args:
            buffer: The round's packages (their order is the summation order).
        """
        arena = _shared_arena(buffer)
        if arena is None:
            super().global_update(buffer)
            return
        from emberfl.aggregation import weighted_mean

        out = torch.empty(arena.dim, dtype=torch.float32)
        weighted_mean(
            arena,
            [p.slot for p in buffer if isinstance(p, FedAvgVectorizedUplinkPackage)],
            [float(p.data_size) for p in buffer],
            out,
            num_threads=self.aggregation_threads,
        )
        deserialize_model(self.model, out)


def _rows(arena: ParamArena, start: int, count: int) -> torch.Tensor:
    """Return slots ``start .. start + count`` as a ``(count, dim)`` tensor of their own.

    A fresh alias of the shared memory (not a view of ``arena.tensor``) has its own autograd
    version counter, so chunks trained in parallel threads can update their slots in
    place while another chunk's backward pass checks its saved tensors.
    """
    flat = torch.frombuffer(
        arena.core, dtype=torch.float32, count=count * arena.dim, offset=start * arena.dim * 4
    )
    return flat.view(count, arena.dim)


def _shared_arena(buffer: list[FedAvgUplinkPackage]) -> ParamArena | None:
    if not buffer:
        return None
    first = buffer[0]
    if not isinstance(first, FedAvgVectorizedUplinkPackage) or first.arena is None:
        return None
    arena = first.arena
    if arena.closed:
        return None
    for package in buffer:
        if not isinstance(package, FedAvgVectorizedUplinkPackage) or package.arena is not arena:
            return None
        if not 0 <= package.slot < arena.num_slots:
            return None
        params = package.model_parameters
        slot = arena.tensor[package.slot]
        if (
            not isinstance(params, torch.Tensor)
            or params.data_ptr() != slot.data_ptr()
            or params.shape != slot.shape
            or params.dtype != slot.dtype
            or params.stride() != slot.stride()
        ):
            return None
    return arena
