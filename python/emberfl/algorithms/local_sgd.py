"""Local SGD with an extra term: the easy path for gradient-based FL algorithms.

Most FL algorithms are "each client runs SGD on its data, perhaps with an extra gradient
term and some per-client state, and the server applies a rule to the weighted mean of the
updates". :class:`LocalSGD` is that algorithm with four small hooks:

* :meth:`LocalSGD.loss_term` — a term added to each step's loss (FedProx's proximal term);
* :meth:`LocalSGD.gradient` — a change to each step's gradients (SCAFFOLD's correction);
* :meth:`LocalSGD.finish` — what the client sends up and keeps, from its trained model,
  the global model and its state (SCAFFOLD's ``Δc``, FedDyn's state update);
* :meth:`Algorithm.server_update` — what the server does with the round's means.

The hooks see tensors, never a schedule. In the per-client executors (serial, thread,
process) a parameter has its own shape, ``(*shape)``; in the vectorized executor the
parameters, gradients, states and uplinks of ``C`` clients are stacked, ``(C, *shape)``,
while the global model and the broadcast keep their shape and broadcast against them.
Hooks written with elementwise tensor arithmetic (``+``, ``*``, ``torch.where``, ...) work
unchanged in both, so one definition runs in every mode. A hook that reduces over
elements must keep the client dimension (``dim=-1`` of a flat vector).

FedAvg is this class with no hook overridden (:class:`~emberfl.algorithms.fedavg.FedAvg`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from emberfl.algorithms.base import (
    Aggregate,
    Algorithm,
    Client,
    ClientResult,
    Grads,
    ModelLayout,
    ServerState,
    Tree,
    check_positive,
    iter_epochs,
)
from emberfl.core.vectorized import StackedAdam, StackedSGD
from emberfl.errors import ConfigError
from emberfl.nn import prepare_dropout
from emberfl.rng import Purpose, stream

if TYPE_CHECKING:
    from emberfl.privacy import DPSGD

__all__ = ["ClientUpdate", "LocalResult", "LocalSGD", "Terms", "train_locally"]


@dataclass
class Terms:
    """What :meth:`LocalSGD.loss_term` and :meth:`LocalSGD.gradient` see besides the
    parameters.

    Attributes:
        global_params: The global model's trainable parameters (``(*shape)``).
        state: The client's state (:meth:`Algorithm.client_state`); entries of the model's
            size are :data:`Tree` views with the parameters' names, others flat tensors.
            ``(C, ...)`` in the vectorized executor.
        server: The broadcast's other entries, shaped like ``state``'s (never stacked).
        step: The local step, from 0.
    """

    global_params: Tree
    state: dict[str, Any]
    server: dict[str, Any]
    step: int = 0


@dataclass
class LocalResult:
    """A client after local training, as :meth:`LocalSGD.finish` sees it (flat vectors).

    Attributes:
        model: The trained model ``y`` (``(dim,)``; ``(C, dim)`` when vectorized).
        global_model: The global model ``x`` it started from (``(dim,)``).
        state: The client's state, flat (``(C, n)`` when vectorized).
        server: The broadcast's other entries, flat.
        steps: Local steps taken (an int; a ``(C, 1)`` float tensor when vectorized).
        num_samples: Training samples (an int; ``(C, 1)`` when vectorized).
        lr: The local learning rate.
        state_is_new: Whether the state held no earlier result (a bool; ``(C, 1)`` bool
            tensor when vectorized).
    """

    model: torch.Tensor
    global_model: torch.Tensor
    state: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]
    steps: Any
    num_samples: Any
    lr: float
    state_is_new: Any = False


@dataclass
class ClientUpdate:
    """What :meth:`LocalSGD.finish` returns.

    Attributes:
        uplink: One flat tensor per stream of :meth:`Algorithm.uplink_streams`.
        state: New values of the client's state entries (written by the executor once the
            client is done; entries not listed keep their values).
        weights: Weights of streams declared ``weight="result"`` (a float; ``(C,)`` when
            vectorized).
    """

    uplink: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)


class LocalSGD(Algorithm):
    """Local SGD on every client, then ``x <- x + server_lr * mean(delta)`` on the server.

    Attributes:
        lr: Local learning rate.
        epochs: Local epochs per round.
        momentum: Local SGD momentum (``torch.optim.SGD``'s meaning).
        weight_decay: Local L2 penalty.
        server_lr: Server learning rate ``eta_g`` (1: the mean of the client models).
        stragglers: Fraction of clients that, in a round, run fewer epochs
            (:meth:`local_epochs`).
        drop_stragglers: Whether clients that would not finish :attr:`epochs` are left out
            of the round instead (:meth:`drops`).
        dp: Local DP-SGD (:class:`~emberfl.privacy.DPSGD`) or ``None``.
    """

    name: ClassVar[str] = "local-sgd"
    summary: ClassVar[str] = "local SGD, server step on the weighted mean update"
    vectorizable: ClassVar[bool] = True
    optimizers: ClassVar[tuple[str, ...]] = ("sgd", "adam")
    """The local optimisers the algorithm allows (its equations may assume SGD steps)."""
    local_dp: ClassVar[bool] = True
    """Whether the algorithm can train with local DP-SGD: what it sends must depend on the
    data only through its DP-SGD steps."""

    def __init__(
        self,
        *,
        lr: float,
        epochs: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        server_lr: float = 1.0,
        optimizer: str = "sgd",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        stragglers: float = 0.0,
        drop_stragglers: bool = False,
        dp: DPSGD | None = None,
    ) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            epochs: Local epochs per round (>= 1).
            momentum: Local momentum (>= 0; SGD only).
            weight_decay: Local weight decay (>= 0).
            server_lr: Server learning rate (> 0).
            optimizer: ``"sgd"`` (``torch.optim.SGD``) or ``"adam"`` (``torch.optim.Adam``,
                a fresh state per client and round), among :attr:`optimizers`.
            adam_betas: Adam's moment decays.
            adam_eps: Adam's epsilon.
            stragglers: Systems heterogeneity, in ``[0, 1]``: each client is, in each
                round, a straggler with this probability and then runs a number of
                epochs drawn uniformly from ``1..epochs`` (FedProx's simulation of
                devices that do variable amounts of work, Li 2020, section 5.1).
            drop_stragglers: Leave the clients that would not finish ``epochs`` out of
                the round (FedAvg with a deadline, FedProx's baseline) instead of taking
                their partial work; needs ``stragglers > 0``.
            dp: Train every step with local DP-SGD (per-sample clipping and noise,
                :class:`~emberfl.privacy.DPSGD`), in every mode (vectorized: all samples of
                a chunk's clients in one pass).

        Raises:
            ConfigError: For a value out of range, an optimiser the algorithm does not
                allow, momentum with Adam, or ``dp`` for an algorithm that sends more of
                the data than its DP-SGD steps (:attr:`local_dp`).
        """
        self.lr = check_positive("lr", lr)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.epochs = epochs
        self.momentum = check_positive("momentum", momentum, allow_zero=True)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.server_lr = check_positive("server_lr", server_lr)
        if optimizer not in self.optimizers:
            allowed = " or ".join(repr(o) for o in self.optimizers)
            raise ConfigError(
                f"{type(self).__name__} takes optimizer {allowed}, got {optimizer!r}"
                + (" (its equations assume SGD steps)" if optimizer == "adam" else "")
            )
        self.local_optimizer = optimizer
        if not 0.0 <= float(stragglers) <= 1.0:
            raise ConfigError(f"stragglers must be a fraction in [0, 1], got {stragglers}")
        self.stragglers = float(stragglers)
        if drop_stragglers and self.stragglers == 0.0:
            raise ConfigError("drop_stragglers needs stragglers > 0 (there is nobody to drop)")
        self.drop_stragglers = bool(drop_stragglers)
        if dp is not None and not self.local_dp:
            raise ConfigError(
                f"{type(self).__name__} cannot train with local DP-SGD: what it sends "
                "depends on the data beyond its DP-SGD steps"
            )
        self.dp = dp
        if optimizer == "adam":
            if momentum:
                raise ConfigError("momentum is SGD's; Adam has its own (adam_betas)")
            if len(adam_betas) != 2 or not all(0 <= float(b) < 1 for b in adam_betas):
                raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {adam_betas}")
            self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
            self.adam_eps = check_positive("adam_eps", adam_eps)

    def work(self, seed: int, cid: int, round: int) -> int:
        """Return the epochs client ``cid`` runs in round ``round``: :attr:`epochs`, or, for
        a straggler, a number drawn uniformly from ``1..epochs``.

        Both draws come from the stream ``(seed, LOCAL_WORK, cid, round)``, so a client's
        work does not depend on the mode, the parallelism or the other clients.

        Args:
            seed: The experiment seed.
            cid: The client.
            round: The round (0-based).

        Returns:
            Its local epochs (>= 1).
        """
        if self.stragglers == 0.0 or self.epochs == 1:
            return self.epochs
        u = stream(seed, purpose=Purpose.LOCAL_WORK, client=cid, round=round).random(2)
        if u[0] >= self.stragglers:
            return self.epochs
        return 1 + min(int(u[1] * self.epochs), self.epochs - 1)

    def local_epochs(self, client: Client) -> int:
        """Return the epochs ``client`` runs this round (:meth:`work`)."""
        return self.work(client.seed, client.cid, client.round)

    def drops(self, seed: int, cid: int, round: int) -> bool:
        """Whether client ``cid`` is left out of round ``round``: with
        :attr:`drop_stragglers`, a client that would run fewer than :attr:`epochs`."""
        return self.drop_stragglers and self.work(seed, cid, round) < self.epochs

    # -- hooks ------------------------------------------------------------------------------
    def loss_term(self, params: Tree, terms: Terms) -> torch.Tensor | None:
        """Return a term added to each step's loss, or ``None`` (the default).

        Args:
            params: The live trainable parameters (differentiable).
            terms: The global parameters, state and broadcast.

        Returns:
            A scalar (the sum over stacked clients when vectorized), or ``None``.
        """
        return None

    def gradient(self, grads: Grads, params: Tree, terms: Terms) -> Grads:
        """Return each step's gradients, changed as the algorithm needs (default: as is).

        Args:
            grads: The loss's gradients (``None`` entries for unused parameters).
            params: The parameters they belong to (do not modify).
            terms: The global parameters, state and broadcast.

        Returns:
            The gradients to step with.
        """
        return grads

    def finish(self, result: LocalResult) -> ClientUpdate:
        """Return the uplink (and new state) of a trained client (default: ``delta = y - x``).

        Args:
            result: The trained client.

        Returns:
            The uplink tensors and state updates.
        """
        return ClientUpdate(uplink={"delta": result.model - result.global_model})

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Apply ``x <- x + server_lr * mean(delta)``."""
        state.model.add_(aggregate.mean("delta"), alpha=self.server_lr)

    # -- running ----------------------------------------------------------------------------
    def optimizer(self) -> StackedSGD | StackedAdam:
        """Return a fresh local optimiser (one per client and round)."""
        if self.local_optimizer == "adam":
            return StackedAdam(
                lr=self.lr, betas=self.adam_betas, eps=self.adam_eps, weight_decay=self.weight_decay
            )
        return StackedSGD(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def client_update(self, client: Client) -> ClientResult:
        """Train the client with local SGD and the hooks (per-client executors)."""
        result, metrics = train_locally(self, client)
        update = self.finish(result)
        for name, value in update.state.items():
            client.state[name].copy_(value.reshape(-1))
        return ClientResult(
            uplink=update.uplink,
            num_samples=client.num_samples,
            weights={k: float(v) for k, v in update.weights.items()},
            metrics=metrics,
        )

    def overrides(self, hook: str) -> bool:
        """Whether this class overrides hook ``hook`` of :class:`LocalSGD`."""
        return getattr(type(self), hook) is not getattr(LocalSGD, hook)


def shaped(flat: torch.Tensor, layout: ModelLayout, *, trainable_only: bool = True) -> Any:
    """Return ``flat`` as a tree if it is model-sized (last dimension ``layout.dim``), else
    as it is."""
    if flat.shape[-1] == layout.dim:
        return layout.tree(flat, trainable_only=trainable_only)
    return flat


def train_locally(
    algorithm: LocalSGD, client: Client, *, start: torch.Tensor | None = None
) -> tuple[LocalResult, dict[str, float]]:
    """Run ``algorithm``'s local SGD on one client's model (the per-client executors' loop).

    The step is ``torch.optim.SGD``'s arithmetic (:class:`~emberfl.core.vectorized.StackedSGD`
    on unstacked tensors); with no hook and no momentum it is plain ``p -= lr * grad``.

    Args:
        algorithm: The algorithm.
        client: The client.
        start: The flat model to start from (default: the global model).

    Returns:
        The trained client as :meth:`LocalSGD.finish` sees it, and its metrics
        (``train_loss``: the mean loss of its steps; ``steps``).
    """
    if start is None:
        client.load_global()
    else:
        from emberfl.core import deserialize_model

        client.load_global()  # moves the model to the client's device
        deserialize_model(client.model, start)
    model = client.model
    model.train()
    # Dropout draws from the client's own stream (the vectorized executor draws the same).
    prepare_dropout(model, client.dropout_generator)
    device = client.device
    layout = client.layout
    params: Tree = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = client.broadcast["model"]
    use_loss = algorithm.overrides("loss_term")
    use_grad = algorithm.overrides("gradient")
    terms = None
    if use_loss or use_grad:
        state_dev = {n: t.to(device) for n, t in client.state.items()}
        server_dev = {n: t.to(device) for n, t in client.broadcast.items() if n != "model"}
        terms = Terms(
            global_params=layout.tree(x.to(device), trainable_only=True),
            state={n: shaped(t, layout) for n, t in state_dev.items()},
            server={n: shaped(t, layout) for n, t in server_dev.items()},
        )
    optimizer = algorithm.optimizer()
    criterion = torch.nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    dp = algorithm.dp
    noise = None
    if dp is not None:
        dp.check_model(model)
        noise = dp.noise_generator(client.seed, client.cid, client.round)
    for data, target in iter_epochs(client, algorithm.local_epochs(client)):
        if client.stopped():
            break
        data, target = data.to(device), target.to(device)
        for p in params.values():
            p.grad = None
        loss: Any
        if dp is not None and noise is not None:
            private, loss = dp.gradients(model, params, data, target, noise)
        else:
            loss = criterion(model(data), target)
        total = loss
        extra: Any = None
        if terms is not None:
            terms.step = steps
            if use_loss:
                extra = algorithm.loss_term(params, terms)
                if extra is not None:
                    total = loss + extra
        if dp is None:
            total.backward()
            grads: Grads = {n: p.grad for n, p in params.items()}
        else:
            # The data's part is private; a term without data is added as it is.
            if extra is not None:
                extra.backward()
            grads = {
                n: private[n] if p.grad is None else private[n] + p.grad for n, p in params.items()
            }
        if terms is not None and use_grad:
            grads = algorithm.gradient(grads, params, terms)
        optimizer.step(params, grads, None)
        loss_sum += loss.detach()
        steps += 1
    y = client.flat_model()
    result = LocalResult(
        model=y,
        global_model=x,
        state=dict(client.state),
        server={n: t for n, t in client.broadcast.items() if n != "model"},
        steps=steps,
        num_samples=client.num_samples,
        lr=algorithm.lr,
        state_is_new=client.state_is_new,
    )
    metrics = {"steps": float(steps)}
    if steps:
        metrics["train_loss"] = float(loss_sum) / steps
    return result, metrics
