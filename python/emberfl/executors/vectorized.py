"""The vectorized executor: ``chunk_size`` clients of a local-SGD algorithm train as one
stacked model.

Every trainable parameter gets a leading client dimension and one
:func:`torch.func.vmap`-ed forward/backward pass gives every client of the chunk its own
gradient (:mod:`emberfl.core.vectorized`). The algorithm's hooks
(:class:`~emberfl.algorithms.local_sgd.LocalSGD`) run on the stacked tensors, so any
algorithm written with elementwise hooks runs here unchanged:

* each client reads its own mini-batches in its own stream's order, from the very loader
  the serial executor would build; clients with fewer samples or steps are padded and
  masked (never updated on a step they do not have);
* per-client state is gathered from the state store into ``(C, n)`` tensors for the
  chunk and written back once the chunk is done;
* the results equal the serial executor's up to float rounding (batched kernels sum in
  another order: about 1e-6 relative after a round), are deterministic, and do not depend
  on ``num_parallels`` (bitwise) or ``chunk_size`` (up to rounding).

Chunks run ``num_parallels`` at a time in threads; their results are consumed in
client-list order, with at most ``2 * num_parallels`` chunks trained ahead of the one being
consumed. Algorithms that are not local SGD (``vectorizable = False``) are refused with a
message naming the modes that run them.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from emberfl.algorithms.base import ClientResult, iter_epochs
from emberfl.algorithms.compressed import RESIDUAL, Compressed
from emberfl.algorithms.local_sgd import LocalResult, LocalSGD, Terms, shaped
from emberfl.core._threads import ClientThreads, Deadline
from emberfl.core.heap import retain_freed_memory
from emberfl.core.intra_op import intra_op_threads
from emberfl.core.vectorized import ConvMode, DropoutCall, VectorizedModel, stack_batches
from emberfl.errors import ClientError, ClientTimeoutError, ConfigError
from emberfl.executors.base import (
    ClientSetup,
    Consume,
    Executor,
    RoundPlan,
    check_positive_int,
    check_result,
)
from emberfl.nn import dropout_mask
from emberfl.rng import Purpose, stream

if TYPE_CHECKING:
    from emberfl.privacy import DPSGD

_DRAIN_S = 1.0  # after a failure, how long running chunks get to stop

__all__ = ["DEFAULT_CPU_CHUNK", "VectorizedExecutor", "default_chunk_size"]

DEFAULT_CPU_CHUNK = 32
"""The most clients at once on the CPU when ``chunk_size`` is ``None`` (the whole round
elsewhere). The round is split into equal chunks of at most this many clients, and into a
multiple of ``num_parallels`` chunks so that the threads get equal work
(:func:`default_chunk_size`; ``benches/bench_vectorized.py`` measures the scaling)."""
CPU_CHUNK_BYTES = 128 << 20
"""On the CPU, a default chunk also holds at most this many bytes of stacked parameters:
each step streams the chunk's parameters, gradients and optimiser state through memory,
so a chunk of large models gains nothing over fewer clients at once and falls out of the
caches."""


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


def _masks(
    calls: tuple[DropoutCall, ...],
    batches: list[tuple[torch.Tensor, torch.Tensor] | None],
    clients: Iterable[int],
    width: int,
    rngs: list[torch.Generator],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Each client's dropout masks for one step, drawn from its own generator in the order a
    per-client forward pass draws them, padded to ``width`` samples (no draw for padding)."""
    if not calls:
        return {}
    order = list(clients)
    out = {
        call.key: torch.zeros((len(order), width, *call.shape), dtype=torch.float32)
        for call in calls
    }
    for row, i in enumerate(order):
        batch = batches[i]
        if batch is None:
            continue
        n = int(batch[0].shape[0])
        for call in calls:
            out[call.key][row, :n] = dropout_mask((n, *call.shape), call.p, rngs[i])
    return {k: v.to(device) for k, v in out.items()}


def _select_terms(terms: Terms, index: torch.Tensor) -> Terms:
    """``terms`` with the per-client state of the clients in ``index`` only."""

    def pick(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v.index_select(0, index) for k, v in value.items()}
        return value.index_select(0, index)

    return Terms(
        global_params=terms.global_params,
        state={n: pick(v) for n, v in terms.state.items()},
        server=terms.server,
        step=terms.step,
    )


@dataclass
class _Chunk:
    """A trained chunk: its clients' results (views of its CPU buffers)."""

    cids: list[int]
    results: list[ClientResult]


class VectorizedExecutor(Executor):
    """Clients of a :class:`~emberfl.algorithms.local_sgd.LocalSGD` algorithm, ``chunk_size``
    at a time as one stacked model.

    Attributes:
        chunk_size: Clients trained at once (``None``: :func:`default_chunk_size` on the
            CPU, every client of the round elsewhere).
        num_parallels: Chunks trained at once (threads; the result does not depend on it).
        retain_memory: On the CPU, keep freed memory in the process heap between steps.
    """

    name: ClassVar[str] = "vectorized"

    def __init__(
        self,
        setup: ClientSetup,
        *,
        chunk_size: int | None = None,
        num_parallels: int = 1,
        intra_op_threads: int | None = 1,
        client_timeout: float | None = None,
        conv: ConvMode = "auto",
        retain_memory: bool = True,
    ) -> None:
        """Create the executor.

        Args:
            setup: The clients' setup.
            chunk_size: Clients trained at once (>= 1); bounds memory to about
                ``chunk_size`` models, optimiser states and mini-batches per thread.
            num_parallels: Chunks trained at once, each in its own thread.
            intra_op_threads: PyTorch's intra-op thread count while training; keep 1 and
                raise ``num_parallels`` to use more cores.
            client_timeout: Seconds a client may train before the round fails with a
                :class:`~emberfl.errors.ClientTimeoutError` (``None``: no limit).
            conv: How per-client convolutions run (:data:`~emberfl.core.vectorized.ConvMode`).
            retain_memory: Keep freed CPU memory in the heap between steps
                (:func:`emberfl.core.heap.retain_freed_memory`, glibc only).

        Raises:
            ConfigError: A bad ``chunk_size`` or ``num_parallels``, or a model vectorized
                training does not support (the message names the layer).
        """
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        check_positive_int("num_parallels", num_parallels)
        super().__init__(setup, intra_op_threads=intra_op_threads, client_timeout=client_timeout)
        self.chunk_size = chunk_size
        self.num_parallels = num_parallels
        self.retain_memory = retain_memory
        self._vmodel = VectorizedModel(setup.model, conv=conv, device=setup.device)
        self._replicas: list[VectorizedModel] = [self._vmodel]
        self._lock = threading.Lock()

    @property
    def parallelism(self) -> int:
        """Chunks trained at once."""
        return self.num_parallels

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` chunk by chunk, calling ``consume`` in order.

        Raises:
            ConfigError: The algorithm is not a vectorizable local-SGD algorithm.
            ClientError: Training a chunk raised (it names the chunk's first client and
                lists the others).
            TensorMismatchError: The broadcast model or an uplink has the wrong size.
            ClientTimeoutError: A chunk trained longer than ``client_timeout`` (a chunk's
                clients train together, so the limit applies to the chunk; the error
                names its first client and lists the others). With one thread the
                chunk is interrupted; with several it is asked to stop and left running
                in its thread, and later rounds train on a fresh model.
        """
        compressed = plan.algorithm if isinstance(plan.algorithm, Compressed) else None
        algorithm = compressed.inner if compressed is not None else plan.algorithm
        if not isinstance(algorithm, LocalSGD) or not algorithm.vectorizable:
            raise ConfigError(
                f"{type(algorithm).__name__} is not a local-SGD algorithm with elementwise "
                "hooks, so the vectorized executor cannot run it; use the serial, thread or "
                "process executor"
            )
        if not plan.cids:
            return
        x = plan.broadcast["model"].detach().reshape(-1).to(torch.float32)
        self._vmodel.stack(x, 1)  # validates the layout before any work
        on_cpu = self._vmodel.device.type == "cpu"
        per_client = 4 * plan.layout.dim
        if algorithm.dp is not None:
            algorithm.dp.check_model(self.setup.model)
            per_client *= self.setup.batch_size  # one gradient per sample
        limit = max(1, min(DEFAULT_CPU_CHUNK, CPU_CHUNK_BYTES // per_client))
        chunk = self.chunk_size or (
            default_chunk_size(len(plan.cids), self.num_parallels, limit)
            if on_cpu
            else len(plan.cids)
        )
        if on_cpu and self.retain_memory:
            retain_freed_memory()
        starts = list(range(0, len(plan.cids), chunk))
        workers = min(self.num_parallels, len(starts))
        while len(self._replicas) < workers:
            self._replicas.append(self._vmodel.replica())
        if plan.state is not None:
            for cid in plan.cids:  # slots are allocated here, in one thread
                plan.state.views(cid)
        free: deque[VectorizedModel] = deque(self._replicas[:workers])
        for vmodel in free:
            vmodel.load_shared(x)
        self.stop_event.clear()

        def train(start: int) -> _Chunk:
            cids = plan.cids[start : start + chunk]
            with self._lock:
                vmodel = free.popleft()
            try:
                done = self._train_chunk(vmodel, plan, algorithm, x, cids)
                if compressed is not None:
                    self._compress(compressed, plan, done)
                return done
            except ClientError:
                self.stop_event.set()
                raise
            except Exception as exc:
                self.stop_event.set()
                others = f" (chunk of clients {cids})" if len(cids) > 1 else ""
                raise ClientError(cids[0], f"{type(exc).__name__}: {exc}{others}") from exc
            finally:
                with self._lock:
                    free.append(vmodel)

        position = 0
        timeout = self.client_timeout
        with intra_op_threads(self.intra_op_threads):
            if workers == 1:
                for start in starts:
                    deadline = Deadline(timeout)
                    try:
                        with deadline:
                            done = train(start)
                    except KeyboardInterrupt:
                        if deadline.fired and timeout is not None:
                            raise self._timed_out(
                                plan.cids[start : start + chunk], deadline.elapsed, timeout
                            ) from None
                        raise
                    position = self._deliver(done, plan, consume, position)
                return
            threads = ClientThreads(workers, timeout=timeout, name="emberfl-chunk")
            pending: deque[Future[_Chunk]] = deque()
            following: Iterator[int] = iter(starts)
            try:
                while True:
                    while len(pending) < 2 * workers:
                        upcoming = next(following, None)
                        if upcoming is None:
                            break
                        # A chunk is known by its first client.
                        pending.append(threads.submit(plan.cids[upcoming], train, upcoming))
                    if not pending:
                        break
                    try:
                        done = threads.result(pending.popleft())
                    except ClientTimeoutError as exc:
                        first = plan.cids.index(exc.cid)
                        raise self._timed_out(
                            plan.cids[first : first + chunk], exc.elapsed, exc.timeout
                        ) from None
                    position = self._deliver(done, plan, consume, position)
            finally:
                self.stop_event.set()
                if threads.close(drain_s=_DRAIN_S):
                    # A stuck chunk keeps its model: later rounds must not share it.
                    self._vmodel = self._vmodel.replica()
                    self._replicas = [self._vmodel]

    @staticmethod
    def _timed_out(cids: list[int], elapsed: float, timeout: float) -> ClientTimeoutError:
        others = f" (trained together with clients {cids[1:]})" if len(cids) > 1 else ""
        return ClientTimeoutError(
            cids[0],
            elapsed,
            timeout,
            (cids[0],),
            f"its chunk was asked to stop{others}",
        )

    @staticmethod
    def _deliver(done: _Chunk, plan: RoundPlan, consume: Consume, position: int) -> int:
        for cid, result in zip(done.cids, done.results, strict=True):
            consume(position, cid, check_result(result, plan, cid))
            position += 1
        return position

    def _train_chunk(
        self,
        vmodel: VectorizedModel,
        plan: RoundPlan,
        algorithm: LocalSGD,
        x: torch.Tensor,
        cids: list[int],
    ) -> _Chunk:
        device = vmodel.device
        layout = plan.layout
        c = len(cids)
        clients = [self.client(plan, cid, vmodel.module, state={}) for cid in cids]
        sizes = [cl.num_samples for cl in clients]
        streams: list[Iterator[Any] | None] = [
            iter_epochs(cl, algorithm.local_epochs(cl)) for cl in clients
        ]
        dropout_rngs = [cl.dropout_generator() for cl in clients]
        dp = algorithm.dp
        noise_rngs = [dp.noise_generator(cl.seed, cl.cid, cl.round) for cl in clients] if dp else []
        x_dev = x.to(device)
        # The clients' state lives in ``rows`` (one row per client, flat layout): the
        # first step reads the global parameters through stride-0 views and writes the
        # rows, later steps update them in place; BatchNorm statistics are updated in
        # place by the forward pass.
        rows = torch.empty((c, layout.dim), dtype=torch.float32, device=device)
        vmodel.init_rows(rows, x_dev)
        current = vmodel.broadcast(x_dev, c)
        params = vmodel.row_views(rows)
        # Contiguous copies: an in-place update under vmap would miss a strided view.
        stats = {n: t.clone() for n, t in vmodel.stat_views(rows).items()}
        state_flat: dict[str, torch.Tensor] = {}
        is_new = torch.ones((c, 1), dtype=torch.bool, device=device)
        if plan.state is not None:
            views = [plan.state.views(cid) for cid in cids]
            for name in plan.state.spec:
                state_flat[name] = torch.stack([v[name] for v in views]).to(device)
            is_new = torch.tensor(
                [[not plan.state.is_written(cid)] for cid in cids], dtype=torch.bool, device=device
            )
        server_flat = {n: t.to(device) for n, t in plan.broadcast.items() if n != "model"}
        use_loss = algorithm.overrides("loss_term")
        use_grad = algorithm.overrides("gradient")
        terms = Terms(
            global_params=layout.tree(x_dev, trainable_only=True),
            state={n: shaped(t, layout) for n, t in state_flat.items()},
            server={n: shaped(t, layout) for n, t in server_flat.items()},
        )
        sgd = algorithm.optimizer()
        steps = torch.zeros(c, dtype=torch.float64, device=device)
        loss_sum = torch.zeros(c, dtype=torch.float64, device=device)
        first = True
        step = 0
        while not self.stop_event.is_set():
            batches: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for i, it in enumerate(streams):
                batch = None if it is None else next(it, None)
                if batch is None:
                    streams[i] = None
                batches.append(batch if batch is None or batch[0].shape[0] > 0 else None)
            if all(b is None for b in batches):
                break
            terms.step = step
            if dp is not None:
                grads, losses, active = self._private_step_grads(
                    vmodel, algorithm, dp, batches, current, terms, noise_rngs, use_loss
                )
            else:
                grads, losses, active = self._step_grads(
                    vmodel, algorithm, batches, current, stats, terms, dropout_rngs, use_loss
                )
            if use_grad:
                grads = algorithm.gradient(grads, dict(current), terms)  # (C, *shape) each
            all_active = bool(active.all())
            sgd.step(
                params, grads, None if all_active else active, source=current if first else None
            )
            steps += active
            loss_sum += torch.where(active, losses.double(), 0.0)
            current, first = params, False
            step += 1
        for name, view in vmodel.stat_views(rows).items():
            view.copy_(stats[name])
        vmodel.finish_rows(rows, x_dev, steps, trained=not first)
        result = LocalResult(
            model=rows,
            global_model=x_dev,
            state=state_flat,
            server=server_flat,
            steps=steps.to(torch.float32).view(c, 1),
            num_samples=torch.tensor(sizes, dtype=torch.float32, device=device).view(c, 1),
            lr=algorithm.lr,
            state_is_new=is_new,
        )
        update = algorithm.finish(result)
        if plan.state is not None and update.state:
            for name, value in update.state.items():
                values = value.reshape(c, -1).to("cpu", torch.float32)
                for i, cid in enumerate(cids):
                    plan.state.views(cid)[name].copy_(values[i])
        uplinks = {n: t.reshape(c, -1).to("cpu", torch.float32) for n, t in update.uplink.items()}
        weights_out = {
            n: (w.reshape(c).tolist() if isinstance(w, torch.Tensor) else [float(w)] * c)
            for n, w in update.weights.items()
        }
        steps_cpu = steps.cpu().tolist()
        loss_cpu = loss_sum.cpu().tolist()
        results = []
        for i, size in enumerate(sizes):
            metrics = {"steps": float(steps_cpu[i])}
            if steps_cpu[i] > 0:
                metrics["train_loss"] = loss_cpu[i] / steps_cpu[i]
            results.append(
                ClientResult(
                    uplink={n: t[i] for n, t in uplinks.items()},
                    num_samples=size,
                    weights={n: w[i] for n, w in weights_out.items()},
                    metrics=metrics,
                )
            )
        return _Chunk(cids, results)

    def _compress(self, compressed: Compressed, plan: RoundPlan, done: _Chunk) -> None:
        """Encode each client's update as :meth:`Compressed.client_update` does, with its
        residual from the state store and its own compression stream."""
        seed = self.setup.seed
        for cid, result in zip(done.cids, done.results, strict=True):
            residual = None
            if compressed.error_feedback and plan.state is not None:
                residual = plan.state.views(cid)[RESIDUAL]
            own = functools.partial(
                stream, seed, purpose=Purpose.COMPRESSION, client=cid, round=plan.round
            )
            compressed.compress_result(result, residual, own)

    @staticmethod
    def _private_step_grads(
        vmodel: VectorizedModel,
        algorithm: LocalSGD,
        dp: DPSGD,
        batches: list[tuple[torch.Tensor, torch.Tensor] | None],
        current: dict[str, torch.Tensor],
        terms: Terms,
        noise_rngs: list[torch.Generator],
        use_loss: bool,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """One DP-SGD step's gradients of every client (:class:`~emberfl.privacy.DPSGD`'s
        arithmetic, stacked): per-sample gradients clipped, summed, noised from each active
        client's own generator in parameter order, divided by its batch size."""
        device = vmodel.device
        inputs, targets, weights, active = stack_batches(batches, device)
        per_sample, losses = vmodel.per_sample_grads(current, inputs, targets, weights)
        c, b = weights.shape
        real = weights > 0
        sq = torch.zeros((c, b), dtype=torch.float32, device=device)
        for g in per_sample.values():
            sq += g.reshape(c, b, -1).pow(2).sum(dim=2)
        factor = (dp.clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0) * real
        counts = real.sum(dim=1).clamp(min=1).to(torch.float32)
        on = active.tolist()
        sigma_c = dp.noise_multiplier * dp.clip_norm
        grads: dict[str, torch.Tensor | None] = {}
        for name, g in per_sample.items():
            total = torch.einsum("cb,cb...->c...", factor, g)
            if sigma_c > 0:
                shape = tuple(g.shape[2:])
                noise = torch.stack(
                    [
                        torch.randn(shape, generator=rng, dtype=torch.float32)
                        if on[i]
                        else torch.zeros(shape)
                        for i, rng in enumerate(noise_rngs)
                    ]
                )
                total = total + sigma_c * noise.to(device)
            grads[name] = total / counts.view(c, *([1] * (total.dim() - 1)))
        if use_loss:
            leaves = {n: t.detach().requires_grad_(True) for n, t in current.items()}
            with torch.enable_grad():
                term = algorithm.loss_term(leaves, terms)
                if term is not None:
                    extra = torch.autograd.grad(term, list(leaves.values()), allow_unused=True)
                    for (name, _), e in zip(leaves.items(), extra, strict=True):
                        if e is not None:
                            grads[name] = grads[name] + e  # type: ignore[operator]
        return grads, losses, active

    @staticmethod
    def _step_grads(
        vmodel: VectorizedModel,
        algorithm: LocalSGD,
        batches: list[tuple[torch.Tensor, torch.Tensor] | None],
        current: dict[str, torch.Tensor],
        stats: dict[str, torch.Tensor],
        terms: Terms,
        dropout_rngs: list[torch.Generator],
        use_loss: bool,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """One step's gradients of every client of the chunk: ``(grads, losses, active)``.

        Clients are padded to one batch width, except for models with batch statistics
        (BatchNorm), where clients with different batch sizes run in separate groups so
        that no statistic sees a padded sample.
        """
        device = vmodel.device
        c = len(batches)
        present = [i for i, b in enumerate(batches) if b is not None]
        sample = tuple(batches[present[0]][0].shape[1:])  # type: ignore[index]
        calls = vmodel.dropout_calls(sample)
        if vmodel.has_batch_stats:
            by_size: dict[int, list[int]] = {}
            for i in present:
                by_size.setdefault(int(batches[i][0].shape[0]), []).append(i)  # type: ignore[index]
            groups = list(by_size.values())
        else:
            groups = [list(range(c))]
        if len(groups) == 1 and len(groups[0]) == c:
            inputs, targets, weights, active = stack_batches(batches, device)
            masks = _masks(calls, batches, range(c), int(inputs.shape[1]), dropout_rngs, device)
            extra = (lambda leaves: algorithm.loss_term(leaves, terms)) if use_loss else None
            grads, losses = vmodel.grads_and_losses(
                current, inputs, targets, weights, stats=stats, masks=masks, extra=extra
            )
            return grads, losses, active
        full: dict[str, torch.Tensor | None] = {
            n: torch.zeros((c, *t.shape[1:]), dtype=t.dtype, device=device)
            for n, t in current.items()
        }
        losses = torch.zeros(c, dtype=torch.float32, device=device)
        active = torch.zeros(c, dtype=torch.bool, device=device)
        used: set[str] = set()
        for group in groups:
            index = torch.tensor(group, dtype=torch.int64, device=device)
            sub = [batches[i] for i in group]
            inputs, targets, weights, _ = stack_batches(sub, device)
            masks = _masks(calls, batches, group, int(inputs.shape[1]), dropout_rngs, device)
            params = {n: t.index_select(0, index) for n, t in current.items()}
            sub_stats = {n: t.index_select(0, index) for n, t in stats.items()}
            extra = None
            if use_loss:
                sub_terms = _select_terms(terms, index)
                extra = lambda leaves, st=sub_terms: algorithm.loss_term(leaves, st)  # noqa: E731
            grads, group_losses = vmodel.grads_and_losses(
                params, inputs, targets, weights, stats=sub_stats, masks=masks, extra=extra
            )
            for n, g in grads.items():
                if g is not None:
                    full[n].index_copy_(0, index, g)  # type: ignore[union-attr]
                    used.add(n)
            for n, t in sub_stats.items():
                stats[n].index_copy_(0, index, t)
            losses.index_copy_(0, index, group_losses)
            active[index] = True
        return {n: (t if n in used else None) for n, t in full.items()}, losses, active
