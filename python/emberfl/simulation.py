"""The round loop: an algorithm run by an executor, with streaming aggregation.

:class:`Simulation` owns what is neither the algorithm's nor the executor's business:
client sampling (a pure function of the seed and the round), the broadcast, the
per-stream :class:`~emberfl.aggregation.WeightedSum` that each client's uplink is folded
into as it arrives, the aggregator for the main stream, the client state store, and
checkpointable state. One round::

        sample_clients(round) ─► cids
    algorithm.broadcast(state) ─► broadcast ──► executor.run(plan, consume)
                                                   │ client k: algorithm.client_update
                                                   ▼ (in client-list order)
                           consume: sums[s].add(uplink[s], weight_k[s]) for each stream s
                                                   │
              Aggregate(means, sums, metrics) ◄────┘
    algorithm.server_update(state, aggregate); state.round += 1

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from emberfl.algorithms import FedAvg
    >>> from emberfl.executors import ClientSetup, SerialExecutor
    >>> class Data:
    ...     def __init__(self):
    ...         g = torch.Generator().manual_seed(0)
    ...         self.parts = [TensorDataset(torch.randn(8, 4, generator=g),
    ...                                     torch.randint(0, 2, (8,), generator=g))
    ...                       for _ in range(3)]
    ...     def get_dataset(self, split, cid):
    ...         return self.parts[cid]
    ...     def get_dataloader(self, split, cid, batch_size=None, generator=None):
    ...         return torch.utils.data.DataLoader(self.parts[cid], batch_size=batch_size,
    ...                                            shuffle=True, generator=generator)
    >>> setup = ClientSetup(Data(), torch.nn.Linear(4, 2), batch_size=4, seed=0)
    >>> with Simulation(FedAvg(lr=0.1), SerialExecutor(setup), num_clients=3) as sim:
    ...     metrics = sim.run_round()
    >>> metrics["num_clients"], sim.round
    (3, 1)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from emberfl.aggregation import Aggregator, Mean, UpdateSet, WeightedSum
from emberfl.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientResult,
    ModelLayout,
    ServerState,
    Split,
)
from emberfl.atomic import atomic_write_bytes, read_tensor_file
from emberfl.attacks import Attack
from emberfl.core import deserialize_model, serialize_model
from emberfl.core._threads import Deadline
from emberfl.errors import CheckpointError, ConfigError, EmberflError, ServerTimeoutError
from emberfl.evaluation import evaluate
from emberfl.executors.base import Executor, RoundPlan, check_timeout
from emberfl.rng import Purpose, stream
from emberfl.selection import (
    SELECTIONS,
    Selection,
    power_of_choice,
    select_by_size,
    select_poisson,
    select_uniform,
)
from emberfl.state_store import ClientStateStore, StateBacking

__all__ = ["Simulation", "sample_clients"]


def sample_clients(seed: int, round_: int, num_clients: int, count: int) -> list[int]:
    """Return ``count`` distinct clients out of ``num_clients`` for round ``round_``, sorted.

    A pure function of its arguments (the emberfl stream ``(seed, CLIENT_SAMPLING,
    round)``), so a resumed run samples the same clients
    (:func:`emberfl.selection.select_uniform`).
    """
    return select_uniform(seed, round_, num_clients, count)


class Simulation:
    """An algorithm's rounds, run by an executor (see the module docstring).

    Attributes:
        algorithm: The algorithm.
        executor: The executor.
        num_clients: Clients in the federation.
        clients_per_round: Clients sampled per round.
        layout: The model's flat layout.
        streams: The algorithm's uplink streams.
        aggregator: The rule for the main stream (:class:`~emberfl.aggregation.Mean`).
        state: The server state (global model and the algorithm's tensors).
        client_state: The client state store (``None``: the algorithm keeps none).
        last_timing: Seconds the last round spent folding uplinks into the sums
            (``fold_s``) and in the aggregator and server update (``server_update_s``).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        executor: Executor,
        *,
        num_clients: int,
        clients_per_round: int | None = None,
        aggregator: Aggregator | None = None,
        state_backing: StateBacking = "memory",
        state_dir: str | os.PathLike[str] | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        aggregation_threads: int | None = None,
        server_timeout: float | None = None,
        selection: Selection = "uniform",
        attack: Attack | None = None,
        poc_candidates: int | None = None,
    ) -> None:
        """Set up the server state from the executor's model.

        Args:
            algorithm: The algorithm.
            executor: Runs the clients; its setup's model is the initial global model.
            num_clients: Clients in the federation (>= 1).
            clients_per_round: Clients per round (default: all).
            aggregator: The main stream's rule (default: the streaming weighted mean).
            state_backing: ``"memory"`` or ``"file"`` for the client state store.
            state_dir: The folder of a file-backed store.
            spill_dir: Where an aggregator that needs all updates keeps them when memory
                is short.
            aggregation_threads: Rust threads for the sums (default: PyTorch's count).
            server_timeout: Seconds a round's aggregation and server update may take
                (``None``: no limit). Enforced in the main thread, as Ctrl-C is: a hang in
                Python code (a custom aggregator or ``server_update``) is interrupted
                with :class:`~emberfl.errors.ServerTimeoutError`. Client time limits are
                the executor's ``client_timeout``.
            selection: How :meth:`sample_clients` picks a round's clients
                (:mod:`emberfl.selection`: ``uniform``, ``size``, ``power-of-choice``,
                ``poisson``: each client with probability ``clients_per_round / num_clients``).
            poc_candidates: Power-of-choice's ``d``, the clients asked for their loss
                (default: twice the clients per round, at most all of them).
            attack: Simulated Byzantine clients (:class:`~emberfl.attacks.Attack`): what
                its malicious clients send in the main stream replaces their update as it
                is received, before aggregation, in every mode alike.

        Raises:
            ConfigError: A count out of range, or an aggregator for a stream the algorithm
                does not send.
        """
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        per_round = num_clients if clients_per_round is None else clients_per_round
        if (
            isinstance(per_round, bool)
            or not isinstance(per_round, int)
            or not 1 <= per_round <= num_clients
        ):
            raise ConfigError(
                f"clients_per_round must be an integer in 1..{num_clients}, got {per_round!r}"
            )
        self.algorithm = algorithm
        self.executor = executor
        self.num_clients = num_clients
        self.clients_per_round = per_round
        self.aggregator = aggregator or Mean()
        self.spill_dir = spill_dir
        self.aggregation_threads = aggregation_threads
        self.server_timeout = check_timeout("server_timeout", server_timeout)
        if selection not in SELECTIONS:
            raise ConfigError(
                f"unknown client selection {selection!r}; choose one of: {', '.join(SELECTIONS)}"
            )
        self.selection: Selection = selection
        if poc_candidates is not None and selection != "power-of-choice":
            raise ConfigError(
                f"poc_candidates is power-of-choice's option; selection is {selection!r}"
            )
        candidates = poc_candidates
        if candidates is None:
            candidates = min(num_clients, 2 * per_round)
        if (
            isinstance(candidates, bool)
            or not isinstance(candidates, int)
            or not per_round <= candidates <= num_clients
        ):
            raise ConfigError(
                f"poc_candidates must be an integer in {per_round}..{num_clients} (clients per "
                f"round..clients), got {candidates!r}"
            )
        self.poc_candidates = candidates
        self._sizes: list[int] | None = None
        model = executor.setup.model
        self.layout = ModelLayout.of(model)
        self.streams = algorithm.uplink_streams(self.layout)
        self.attack = attack
        if attack is not None and algorithm.main_stream not in self.streams:
            raise ConfigError(
                f"the {attack.kind} attack poisons {type(algorithm).__name__}'s main stream "
                f"{algorithm.main_stream!r}, which it does not send"
            )
        if self.aggregator.needs_all_updates and algorithm.main_stream not in self.streams:
            raise ConfigError(
                f"aggregator {self.aggregator.name!r} applies to {type(algorithm).__name__}'s "
                f"main stream {algorithm.main_stream!r}, which it does not send "
                f"(streams: {sorted(self.streams)})"
            )
        initial = serialize_model(model).to(torch.float32)
        self.state: ServerState = algorithm.init_server(initial, self.layout)
        spec = algorithm.client_state(self.layout)
        self.client_state: ClientStateStore | None = (
            ClientStateStore(spec, backing=state_backing, directory=state_dir) if spec else None
        )
        self._broken: str | None = None
        self.last_timing: dict[str, float] = {}

    @property
    def round(self) -> int:
        """Rounds completed."""
        return self.state.round

    def sample_clients(self) -> list[int]:
        """Return this round's clients, by the simulation's :attr:`selection` rule."""
        seed, round_ = self.executor.setup.seed, self.state.round
        if self.selection == "uniform":
            return sample_clients(seed, round_, self.num_clients, self.clients_per_round)
        if self.selection == "poisson":
            rate = self.clients_per_round / self.num_clients
            return select_poisson(seed, round_, self.num_clients, rate)
        sizes = self.client_sizes()
        if self.selection == "size":
            return select_by_size(seed, round_, sizes, self.clients_per_round)
        model = self.global_model()
        return power_of_choice(
            seed,
            round_,
            sizes,
            self.clients_per_round,
            self.poc_candidates,
            lambda cid: self._train_loss(model, cid),
        )

    def client_sizes(self) -> list[int]:
        """Return every client's number of training samples (read once, then cached)."""
        if self._sizes is None:
            self._sizes = [self.executor.setup.num_samples(c) for c in range(self.num_clients)]
        return self._sizes

    def _train_loss(self, model: nn.Module, cid: int) -> float:
        """The global model's mean cross-entropy on client ``cid``'s training data."""
        setup = self.executor.setup
        if self.client_sizes()[cid] == 0:
            return 0.0
        seed = stream(setup.seed, purpose=Purpose.EVALUATION, client=cid, round=self.state.round)
        generator = torch.Generator().manual_seed(seed.torch_seed())
        loader = setup.dataset.get_dataloader(Split.TRAIN, cid, setup.batch_size, generator)
        loss, _ = evaluate(model, loader, setup.device)
        return loss

    def run_round(
        self,
        cids: list[int] | None = None,
        *,
        on_result: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """Run one round: broadcast, train, aggregate, update the server state.

        Args:
            cids: The clients (default: :meth:`sample_clients`).
            on_result: Called with ``(position, cid)`` after each client's result is
                folded in (e.g. to advance a progress bar).

        Returns:
            The round's metrics: ``num_clients`` (those that trained), the clients' metrics
            averaged with weights ``num_samples`` (``train_loss``, ``steps``, ...),
            ``num_samples``, ``uplink_bytes`` (what the clients sent: their encoded
            payloads' length, :attr:`ClientResult.uplink_bytes`, or their streams' float32
            size), ``downlink_bytes`` (the broadcast's float32 size times the clients)
            and, when the algorithm left some sampled clients out
            (:meth:`Algorithm.drops`), ``dropped_clients``.

        Raises:
            ClientError: A client failed; the server state is unchanged.
            NonFiniteError: A client sent NaN or infinity (the message names the client,
                the stream, the layer, the index inside the layer and the value).
            TensorMismatchError: A client's uplink does not match the declared streams.
            ServerTimeoutError: The aggregation and server update took longer than
                ``server_timeout``; the simulation cannot go on (restore a checkpoint).
        """
        if self._broken is not None:
            raise EmberflError(self._broken)
        if cids is None:
            cids = self.sample_clients()
        for cid in cids:
            if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < self.num_clients:
                raise ConfigError(
                    f"client {cid!r} does not exist (clients 0..{self.num_clients - 1})"
                )
        seed = self.executor.setup.seed
        dropped = [c for c in cids if self.algorithm.drops(seed, c, self.state.round)]
        if dropped:
            cids = [c for c in cids if c not in set(dropped)]
            if not cids:  # nobody finished: the round passes without an update
                self.state.round += 1
                self.last_timing = {"fold_s": 0.0, "server_update_s": 0.0}
                return {
                    "num_clients": 0.0,
                    "num_samples": 0.0,
                    "uplink_bytes": 0.0,
                    "downlink_bytes": 0.0,
                    "dropped_clients": float(len(dropped)),
                }
        plan = RoundPlan(
            algorithm=self.algorithm,
            broadcast={
                k: v.detach().to("cpu", torch.float32).contiguous()
                for k, v in self.algorithm.broadcast(self.state).items()
            },
            cids=list(cids),
            round=self.state.round,
            layout=self.layout,
            streams=self.streams,
            state=self.client_state,
        )
        folds, kept = self._sums(len(cids))
        totals: dict[str, float] = {}
        samples = 0
        dense_bytes = 4 * sum(spec.dim for spec in self.streams.values())
        uplink_bytes = 0
        done = 0
        fold_s = 0.0

        def consume(position: int, cid: int, result: ClientResult) -> None:
            nonlocal samples, done, fold_s, uplink_bytes
            start = time.perf_counter()
            if position != done or cid != plan.cids[done]:
                raise EmberflError(
                    f"the executor delivered client {cid} at position {position}; expected "
                    f"client {plan.cids[done]} at position {done}"
                )
            source = f"client {cid}"
            for name, spec in self.streams.items():
                weight = result.weight_of(name, spec)
                tensor = result.uplink[name]
                if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
                    tensor = tensor.detach().to("cpu", torch.float32)
                if self.attack is not None and name == self.algorithm.main_stream:
                    tensor = self.attack.poison(cid, plan.round, tensor)
                if name in folds:
                    folds[name].add(tensor, weight, source=source)
                else:
                    kept[name].add(tensor, weight, source=source)
            n = result.num_samples
            samples += n
            uplink_bytes += dense_bytes if result.uplink_bytes is None else result.uplink_bytes
            for key, value in result.metrics.items():
                if n > 0 and math.isfinite(value):
                    totals[key] = totals.get(key, 0.0) + n * value
            if self.client_state is not None:
                self.client_state.mark_written(cid)
            done += 1
            fold_s += time.perf_counter() - start
            if on_result is not None:
                on_result(position, cid)

        try:
            self.executor.run(plan, consume)
            update_start = time.perf_counter()
            if done != len(cids):
                raise EmberflError(
                    f"the {self.executor.name} executor returned {done} of the "
                    f"{len(cids)} clients' results"
                )
            deadline = Deadline(self.server_timeout)
            try:
                with deadline:
                    aggregate = self._aggregate(folds, kept, len(cids))
                    aggregate.metrics = (
                        {k: v / samples for k, v in totals.items()} if samples else {}
                    )
                    self.algorithm.server_update(self.state, aggregate)
            except KeyboardInterrupt:
                if deadline.fired and self.server_timeout is not None:
                    error = ServerTimeoutError(
                        self.state.round + 1, deadline.elapsed, self.server_timeout
                    )
                    self._broken = str(error)
                    raise error from None
                raise
        except BaseException:
            if self.client_state is not None and self._broken is None:
                self._broken = (
                    f"round {self.state.round + 1} failed after some clients had updated their "
                    "state, so this simulation cannot go on; restore a checkpoint "
                    "(load_checkpoint or load_state_tensors) or start again"
                )
            raise
        finally:
            for update_set in kept.values():
                update_set.close()
        self.state.round += 1
        self.last_timing = {
            "fold_s": fold_s,
            "server_update_s": time.perf_counter() - update_start,
        }
        downlink = 4 * sum(t.numel() for t in plan.broadcast.values()) * len(cids)
        result = {
            "num_clients": float(len(cids)),
            "num_samples": float(samples),
            "uplink_bytes": float(uplink_bytes),
            "downlink_bytes": float(downlink),
        }
        if dropped:
            result["dropped_clients"] = float(len(dropped))
        return result | aggregate.metrics

    def _sums(self, count: int) -> tuple[dict[str, WeightedSum], dict[str, UpdateSet]]:
        folds: dict[str, WeightedSum] = {}
        kept: dict[str, UpdateSet] = {}
        for name, spec in self.streams.items():
            # A model-sized stream is named by layer in a non-finite update's message.
            layout = self.layout.items if spec.dim == self.layout.dim else None
            if name == self.algorithm.main_stream and self.aggregator.needs_all_updates:
                kept[name] = UpdateSet(
                    max(count, 1), spec.dim, name=name, layout=layout, spill_dir=self.spill_dir
                )
                continue
            folds[name] = WeightedSum(
                spec.dim, name=name, layout=layout, num_threads=self.aggregation_threads
            )
        return folds, kept

    def _aggregate(
        self, folds: Mapping[str, WeightedSum], kept: Mapping[str, UpdateSet], count: int
    ) -> Aggregate:
        sums = {name: s.sum() for name, s in folds.items()}
        weights = {name: s.weight for name, s in folds.items()}
        means = {}
        for name, s in folds.items():
            means[name] = s.mean() if s.weight > 0 else torch.zeros(s.dim, dtype=torch.float32)
        for name, update_set in kept.items():
            out = torch.zeros(self.streams[name].dim, dtype=torch.float32)
            if update_set.count or self.aggregator.handles_empty:
                self.aggregator.begin_round(self.executor.setup.seed, self.state.round)
                self.aggregator.combine(update_set, out, num_threads=self.aggregation_threads)
            means[name] = out
            weights[name] = float(sum(update_set.weights))
        return Aggregate(
            sums=sums,
            weights=weights,
            means=means,
            count=count,
            population=self.num_clients,
        )

    def run(
        self, rounds: int, *, callback: Callable[[dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run ``rounds`` rounds; return their metrics (``callback`` sees each as it ends)."""
        history = []
        for _ in range(rounds):
            metrics = self.run_round()
            history.append(metrics)
            if callback is not None:
                callback(metrics)
        return history

    # -- the global model -------------------------------------------------------------------
    def global_model(self) -> nn.Module:
        """Return a copy of the model holding the current global parameters (with the
        executor's bitwise-equivalent fast layers, as the clients train it)."""
        model = self.executor.setup.template()
        deserialize_model(model, self.state.model)
        return model

    def load_global_into(self, model: nn.Module) -> None:
        """Copy the global parameters into ``model`` (same architecture)."""
        deserialize_model(model, self.state.model)

    # -- checkpoints ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return everything that carries over between rounds besides the round number.

        Returns:
            ``server/model``, ``server/<name>`` for the algorithm's server tensors,
            ``clients/<...>`` for the client state store (see
            :meth:`~emberfl.state_store.ClientStateStore.state_tensors`) and
            ``aggregator/<name>`` for the aggregator's own state (an adaptive clip bound).
        """
        out = {"server/model": self.state.model.clone()}
        for name, tensor in self.state.tensors.items():
            out[f"server/{name}"] = tensor.detach().to("cpu").clone()
        if self.client_state is not None:
            for name, tensor in self.client_state.state_tensors().items():
                out[f"clients/{name}"] = tensor
        for name, tensor in self.aggregator.state_tensors().items():
            out[f"aggregator/{name}"] = tensor.clone()
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore :meth:`state_tensors` output taken after ``round_`` rounds.

        Raises:
            CheckpointError: Missing or mismatching tensors.
        """
        model = tensors.get("server/model")
        if model is None or tuple(model.shape) != (self.layout.dim,):
            raise CheckpointError(
                f"the saved server model has shape {None if model is None else tuple(model.shape)}"
                f"; this model's flat state has {self.layout.dim} elements"
            )
        expected = set(self.state.tensors)
        saved = {k[len("server/") :] for k in tensors if k.startswith("server/")} - {"model"}
        if saved != expected:
            raise CheckpointError(
                f"the saved server state has tensors {sorted(saved)}; "
                f"{type(self.algorithm).__name__} keeps {sorted(expected)}"
            )
        for name, current in self.state.tensors.items():
            value = tensors[f"server/{name}"]
            if value.shape != current.shape:
                raise CheckpointError(
                    f"saved server tensor {name!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(current.shape)}"
                )
            current.copy_(value)
        own = {
            k[len("aggregator/") :]: v for k, v in tensors.items() if k.startswith("aggregator/")
        }
        if set(own) != set(self.aggregator.state_tensors()):
            raise CheckpointError(
                f"the saved aggregator state has tensors {sorted(own)}; aggregator "
                f"{self.aggregator.name!r} keeps {sorted(self.aggregator.state_tensors())}"
            )
        self.aggregator.load_state_tensors(own)
        clients = {k[len("clients/") :]: v for k, v in tensors.items() if k.startswith("clients/")}
        if self.client_state is not None:
            self.client_state.load_state_tensors(clients)
        elif clients:
            raise CheckpointError(
                f"the checkpoint holds client state, but {type(self.algorithm).__name__} keeps none"
            )
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise CheckpointError(f"the checkpoint's round must be an integer >= 0, got {round_!r}")
        self.state.model.copy_(model)
        self.state.round = round_
        self._broken = None

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_tensors` and the round to one safetensors file, atomically.

        A kill while writing leaves the previous file intact.

        Args:
            path: The file.
        """
        from safetensors.torch import save

        info = {"round": self.state.round, "algorithm": self.algorithm.name, "dim": self.layout.dim}
        blob = save(self.state_tensors(), metadata={"emberfl": json.dumps(info, sort_keys=True)})
        atomic_write_bytes(path, blob)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a file written by :meth:`save_checkpoint`.

        Raises:
            CheckpointError: A missing, corrupt or mismatching file.
        """
        from safetensors import safe_open

        tensors = read_tensor_file(path)
        try:
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {})["emberfl"])
            round_ = info["round"]
            algorithm = info["algorithm"]
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not an emberfl simulation checkpoint ({exc})"
            ) from None
        if algorithm != self.algorithm.name:
            raise CheckpointError(
                f"{path} was written by algorithm {algorithm!r}, not {self.algorithm.name!r}"
            )
        self.load_state_tensors(tensors, round_)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the executor and release the client state. Idempotent."""
        self.executor.close()
        if self.client_state is not None:
            self.client_state.close()

    def __enter__(self) -> Simulation:
        """Return the simulation; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()
