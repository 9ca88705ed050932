"""The algorithm layer: what a client computes and what the server does with it.

An :class:`Algorithm` is defined once, independently of how its clients are scheduled:

* the server side is **explicit state** (:class:`ServerState`: the flat global model plus
  the algorithm's own tensors) and two functions over it: :meth:`Algorithm.broadcast`
  (what goes down to the clients) and :meth:`Algorithm.server_update` (how the round's
  :class:`Aggregate` changes the state);
* the client side is one function, :meth:`Algorithm.client_update`, from a
  :class:`Client` (the client's data, a private copy of the model, the broadcast, its
  per-client state) to a :class:`ClientResult` (named uplink tensors and metrics);
* what travels up is **declared**: :meth:`Algorithm.uplink_streams` names each uplink
  tensor and how it is weighted, and the executor folds every stream into a weighted sum
  as clients finish, in client-list order; the server sees only the sums
  (:class:`Aggregate`). :meth:`Algorithm.client_state` declares per-client state, which the
  executor keeps in a :class:`~emberfl.state_store.ClientStateStore`.

Executors (:mod:`emberfl.executors`: serial, thread, process, vectorized) run any algorithm
written this way; they own the loop over clients, the random streams, the memory and the
reduction, so an algorithm never schedules anything. Most algorithms are "local SGD with an
extra term": :class:`~emberfl.algorithms.local_sgd.LocalSGD` is that shape, with small
hooks, and the vectorized executor runs it many clients at a time. An algorithm that does
not fit (knowledge distillation, clustering, ...) implements :meth:`Algorithm.client_update`
itself.

Flat vectors follow :func:`~emberfl.core.serialize_model`'s order (the model's
``state_dict`` order, integer buffers promoted to float32); :class:`ModelLayout` turns one
into named views and back.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from emberfl.errors import ConfigError, TensorMismatchError
from emberfl.reproducibility import RNGSuite, client_rng_suite
from emberfl.rng import Purpose, Stream, stream

__all__ = [
    "Aggregate",
    "Algorithm",
    "Client",
    "ClientResult",
    "ModelLayout",
    "ServerState",
    "Split",
    "StreamSpec",
    "Tree",
    "Grads",
]

Tree = dict[str, torch.Tensor]
"""Named tensors: ``state_dict``-style names to tensors (views of one flat vector)."""
Grads = dict[str, torch.Tensor | None]
"""Gradients by parameter name (``None`` for a parameter the loss does not use)."""


class Split(StrEnum):
    """The splits of a partitioned data set that the executors read."""

    TRAIN = "train"
    TEST = "test"


# ------------------------------------------------------------------------------------------
# Flat vectors and their names
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutItem:
    """One tensor of a model's flat state.

    Attributes:
        name: The ``state_dict`` key.
        shape: The tensor's shape.
        offset: Its first element in the flat vector.
        numel: Its number of elements.
        trainable: Whether it is a parameter with ``requires_grad``.
        dtype: Its dtype in the model (the flat vector is float32).
        batch_norm: Whether it belongs to a BatchNorm layer (its affine parameters or
            running statistics).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    trainable: bool
    dtype: torch.dtype
    batch_norm: bool = False


@dataclass(frozen=True)
class ModelLayout:
    """How a model's state is laid out in one flat float32 vector.

    Attributes:
        items: One item per ``state_dict`` entry, in order.
        dim: Elements of the flat vector.
    """

    items: tuple[LayoutItem, ...]
    dim: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        """Return the layout of ``model``'s ``state_dict``.

        Args:
            model: The model.

        Returns:
            Its layout.
        """
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        norm_prefixes = tuple(
            f"{name}." if name else ""
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        )
        items = []
        offset = 0
        for name, tensor in model.state_dict().items():
            numel = tensor.numel()
            shape = tuple(int(s) for s in tensor.shape)
            is_norm = any(name.startswith(p) and "." not in name[len(p) :] for p in norm_prefixes)
            items.append(
                LayoutItem(name, shape, offset, numel, name in trainable, tensor.dtype, is_norm)
            )
            offset += numel
        return cls(tuple(items), offset)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """The trainable parameters' names, in order."""
        return tuple(i.name for i in self.items if i.trainable)

    def tree(self, flat: torch.Tensor, *, trainable_only: bool = False) -> Tree:
        """Return named views of a flat vector (zero-copy).

        Args:
            flat: ``(dim,)``, or ``(C, dim)`` for ``C`` stacked clients.
            trainable_only: Only the trainable parameters.

        Returns:
            ``name -> (*shape)`` (or ``(C, *shape)``) views of ``flat``.

        Raises:
            TensorMismatchError: If ``flat``'s last dimension is not :attr:`dim`.
        """
        if flat.shape[-1] != self.dim or flat.dim() > 2:
            raise TensorMismatchError(
                f"a flat model vector has {self.dim} elements, got shape {tuple(flat.shape)}"
            )
        lead = tuple(flat.shape[:-1])
        return {
            i.name: flat[..., i.offset : i.offset + i.numel].view(*lead, *i.shape)
            for i in self.items
            if i.trainable or not trainable_only
        }

    def name_at(self, index: int) -> str:
        """Return the name of the tensor holding flat element ``index``."""
        for i in self.items:
            if i.offset <= index < i.offset + i.numel:
                return i.name
        return f"<element {index} of {self.dim}>"

    def describe(self, limit: int = 6) -> str:
        """Return ``"name (shape), ..."`` for the first ``limit`` tensors."""
        parts = [f"{i.name} {i.shape}" for i in self.items[:limit]]
        if len(self.items) > limit:
            parts.append(f"... {len(self.items) - limit} more")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# What travels
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """One uplink tensor and how the executor weights it in the round's sum.

    Attributes:
        dim: Its number of float32 elements.
        weight: ``"samples"``: the client's number of training samples (FedAvg's
            weighting); ``"uniform"``: 1 for every client; ``"result"``: the value the
            client puts in :attr:`ClientResult.weights`.
    """

    dim: int
    weight: Literal["samples", "uniform", "result"] = "samples"


@dataclass
class ClientResult:
    """What one client sends up, and its metrics.

    Attributes:
        uplink: One flat float32 tensor per stream of :meth:`Algorithm.uplink_streams`.
        num_samples: The client's training samples (the ``"samples"`` weight).
        weights: Weights of the streams declared with ``weight="result"``.
        metrics: Numbers worth logging (``train_loss``, ``steps``, ...); the executor
            averages them over the round, weighted by ``num_samples``.
        uplink_bytes: The bytes the client's message takes on the wire when it is
            encoded (:mod:`emberfl.compression`); ``None``: the streams' float32 size.
    """

    uplink: dict[str, torch.Tensor]
    num_samples: int
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    uplink_bytes: int | None = None

    def weight_of(self, name: str, spec: StreamSpec) -> float:
        """Return the aggregation weight of stream ``name``."""
        if spec.weight == "samples":
            return float(self.num_samples)
        if spec.weight == "uniform":
            return 1.0
        if name not in self.weights:
            raise TensorMismatchError(
                f"stream {name!r} is weighted by the client's result, but the result has no "
                f"weight for it (weights: {sorted(self.weights)})"
            )
        return float(self.weights[name])


@dataclass
class ServerState:
    """The server's side of an algorithm: everything that carries over between rounds.

    Attributes:
        model: The flat float32 global model (:class:`ModelLayout` order).
        tensors: The algorithm's own server tensors (momentum, control variates, ...);
            checkpointed with the model.
        round: Rounds completed.
    """

    model: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0


@dataclass
class Aggregate:
    """A round's uplinks as the server sees them: one weighted sum per stream.

    Attributes:
        sums: ``name -> float32 sum_k w_k x_k``.
        weights: ``name -> sum_k w_k``.
        means: ``name -> the stream's combined update``: the weighted mean, or the
            aggregator's result for the main stream when one is configured.
        count: Clients in the round (``m``).
        population: Clients in the federation (``N``).
        metrics: The clients' metrics, averaged with weights ``num_samples``.
    """

    sums: dict[str, torch.Tensor]
    weights: dict[str, float]
    means: dict[str, torch.Tensor]
    count: int
    population: int
    metrics: dict[str, float] = field(default_factory=dict)

    def mean(self, name: str) -> torch.Tensor:
        """Return stream ``name``'s combined update (``sum / weight`` unless an aggregator
        replaced it)."""
        return self.means[name]

    def sum(self, name: str) -> torch.Tensor:
        """Return stream ``name``'s weighted sum."""
        return self.sums[name]


# ------------------------------------------------------------------------------------------
# The client's view
# ------------------------------------------------------------------------------------------


class Client:
    """Everything one client's computation may use; built by the executor.

    Attributes:
        cid: The client id.
        round: The round (0-based).
        seed: The experiment seed.
        device: Where to compute.
        model: A private copy of the model's architecture (its values are the executor's
            template's, not the global model's: load ``broadcast["model"]`` yourself, or
            use :meth:`load_global`).
        layout: The flat layout of ``model``.
        broadcast: What the server sent (:meth:`Algorithm.broadcast`), read-only.
        state: This client's state views (:meth:`Algorithm.client_state`), writable in
            place; zeros the first time.
        state_is_new: Whether ``state`` holds no earlier result yet.
        num_samples: The client's training samples.
    """

    def __init__(
        self,
        *,
        cid: int,
        round: int,
        seed: int,
        device: str | torch.device,
        model: nn.Module,
        layout: ModelLayout,
        broadcast: Mapping[str, torch.Tensor],
        state: dict[str, torch.Tensor],
        state_is_new: bool,
        loader_factory: Callable[[Split, torch.Generator], DataLoader[Any]],
        num_samples: int,
        stop_event: threading.Event | Any | None = None,
    ) -> None:
        """Create the view (done by executors).

        Args:
            cid: The client id.
            round: The round.
            seed: The experiment seed.
            device: Where to compute.
            model: The client's private model.
            layout: Its flat layout.
            broadcast: The server's broadcast.
            state: The client's state views.
            state_is_new: Whether the state holds no earlier result.
            loader_factory: ``(split, generator) -> DataLoader`` of this client's data.
            num_samples: Its training samples.
            stop_event: Set when the client should stop early.
        """
        self.cid = cid
        self.round = round
        self.seed = seed
        self.device = torch.device(device)
        self.model = model
        self.layout = layout
        self.broadcast = broadcast
        self.state = state
        self.state_is_new = state_is_new
        self.num_samples = num_samples
        self._loader_factory = loader_factory
        self._stop = stop_event
        self._rng: RNGSuite | None = None

    @property
    def rng(self) -> RNGSuite:
        """The client's generators for this round (``client_rng_suite(seed, cid, round)``)."""
        if self._rng is None:
            self._rng = client_rng_suite(self.seed, self.cid, self.round)
        return self._rng

    def stream(self, purpose: int = Purpose.CLIENT_TRAINING) -> Stream:
        """Return the emberfl stream ``(seed, purpose, cid, round)``."""
        return stream(self.seed, purpose=purpose, client=self.cid, round=self.round)

    def dropout_generator(self) -> torch.Generator:
        """Return a fresh generator on the stream ``(seed, DROPOUT, cid, round)``: what the
        client's :class:`emberfl.nn.Dropout` layers draw their masks from."""
        seed = stream(self.seed, purpose=Purpose.DROPOUT, client=self.cid, round=self.round)
        return torch.Generator().manual_seed(seed.torch_seed())

    def loader(self, split: Split = Split.TRAIN) -> DataLoader[Any]:
        """Return a loader over the client's ``split``, shuffled by the client's generator.

        Each call draws from the same generator (:attr:`rng`), so a second epoch is
        shuffled differently, exactly as a second pass over one ``DataLoader`` is.
        """
        return self._loader_factory(split, self.rng.torch_cpu)

    def evaluation_loader(self, split: Split = Split.TRAIN) -> DataLoader[Any]:
        """Return a loader over ``split`` for evaluation, shuffled (if at all) by the
        stream ``(seed, EVALUATION, cid, round)``, so evaluating never moves the training
        generator (:attr:`rng`)."""
        seed = stream(self.seed, purpose=Purpose.EVALUATION, client=self.cid, round=self.round)
        return self._loader_factory(split, torch.Generator().manual_seed(seed.torch_seed()))

    def mean_loss(self, split: Split = Split.TRAIN) -> float:
        """Return :attr:`model`'s mean cross-entropy on ``split`` (eval mode, no gradients;
        :func:`emberfl.evaluation.evaluate`); 0 for a client without data."""
        from emberfl.evaluation import evaluate

        if self.num_samples == 0 and split == Split.TRAIN:
            return 0.0
        was_training = self.model.training
        loss, _ = evaluate(self.model, self.evaluation_loader(split), self.device)
        self.model.train(was_training)
        return loss

    def stopped(self) -> bool:
        """Whether the executor asked the client to stop (check it between batches)."""
        return self._stop is not None and bool(self._stop.is_set())

    def load_global(self) -> None:
        """Load ``broadcast["model"]`` into :attr:`model` (on :attr:`device`)."""
        from emberfl.core import deserialize_model

        first = next(self.model.parameters(), None)
        if first is not None and first.device != self.device:
            self.model.to(self.device)
        deserialize_model(self.model, self.broadcast["model"])

    def flat_model(self) -> torch.Tensor:
        """Return :attr:`model`'s state as a flat float32 CPU vector."""
        from emberfl.core import serialize_model

        return serialize_model(self.model).to(torch.float32)


# ------------------------------------------------------------------------------------------
# The algorithm
# ------------------------------------------------------------------------------------------


class Algorithm(ABC):
    """A federated algorithm: server state, what a client computes, how the server folds it.

    Subclasses hold hyper-parameters only (an algorithm object is sent to worker
    processes once and must be picklable); everything that changes lives in
    :class:`ServerState` or in the client state store.

    Attributes:
        name: The algorithm's name (``emberfl run --algorithm NAME``).
        summary: One line for ``emberfl run --help``.
        main_stream: The stream an :class:`~emberfl.aggregation.Aggregator` other than the
            mean applies to.
        vectorizable: Whether the vectorized executor can run it (true for
            :class:`~emberfl.algorithms.local_sgd.LocalSGD` subclasses whose hooks work on
            stacked tensors).
        personalised: Whether clients keep models of their own (:meth:`personal_model`),
            evaluated on their own test splits.
        adapts: Whether a client is judged after :meth:`adapt` on its own data.
    """

    name: ClassVar[str] = "algorithm"
    summary: ClassVar[str] = ""
    main_stream: ClassVar[str] = "delta"
    vectorizable: ClassVar[bool] = False
    personalised: ClassVar[bool] = False
    adapts: ClassVar[bool] = False

    def adapt(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Adapt a copy of the global model to a client before it is judged (in place, on
        one batch of the client's training data); nothing by default. Per-FedAvg takes
        one gradient step.

        Args:
            model: A copy of the global model.
            batch: ``(inputs, labels)`` from the client's training data.
        """
        return None

    def personal_model(
        self, state: dict[str, torch.Tensor], server: ServerState, layout: ModelLayout
    ) -> torch.Tensor | None:
        """Return a client's own model (flat) from its state, or ``None`` (the default:
        clients use the global model). Personalised algorithms are judged on it, on each
        client's own test split.

        Args:
            state: The client's state views (:meth:`client_state`).
            server: The server state (the global model and the algorithm's tensors).
            layout: The model's layout.

        Returns:
            A flat float32 model, or ``None``.
        """
        return None

    def drops(self, seed: int, cid: int, round: int) -> bool:
        """Whether sampled client ``cid`` is left out of round ``round`` before it trains
        (default: never; :class:`~emberfl.algorithms.local_sgd.LocalSGD` drops stragglers
        when asked). A pure function of its arguments, so every mode drops the same."""
        return False

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """Declare the uplink tensors (default: ``"delta"``, weighted by sample count).

        Args:
            layout: The model's flat layout.

        Returns:
            ``name -> spec`` for every tensor a client sends.
        """
        return {"delta": StreamSpec(layout.dim, "samples")}

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """Declare per-client state (default: none).

        Args:
            layout: The model's flat layout.

        Returns:
            ``name -> float32 elements`` (use ``layout.dim`` for model-sized state).
        """
        return {}

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return the server state before round 0.

        Args:
            model: The initial flat global model.
            layout: Its layout.

        Returns:
            The state (default: the model and no other tensor).
        """
        return ServerState(model=model.detach().to(torch.float32).clone())

    def broadcast(self, state: ServerState) -> dict[str, torch.Tensor]:
        """Return what goes down to this round's clients (default: ``{"model": ...}``).

        Args:
            state: The server state.

        Returns:
            Named tensors, read-only for the clients.
        """
        return {"model": state.model}

    @abstractmethod
    def client_update(self, client: Client) -> ClientResult:
        """Compute one client's contribution (runs wherever the executor puts it).

        Args:
            client: The client's data, model copy, broadcast and state.

        Returns:
            One tensor per declared stream, and metrics.
        """

    @abstractmethod
    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Fold the round's aggregate into the server state, in place.

        Args:
            state: The server state (``state.round`` is incremented afterwards by the
                caller).
            aggregate: The round's weighted sums.
        """

    def describe(self) -> str:
        """Return ``"name(hyper=value, ...)"`` for logs (options left at ``None`` omitted)."""
        params = ", ".join(
            f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and v is not None
        )
        return f"{self.name}({params})"


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` if it is a finite positive number (or zero when allowed).

    Raises:
        ConfigError: Naming ``name`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return float(value)


def iter_epochs(client: Client, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``epochs`` passes over the client's training batches, in the loader's order."""
    from emberfl.core.batches import iter_batches

    for _ in range(epochs):
        yield from iter_batches(client.loader(Split.TRAIN))
