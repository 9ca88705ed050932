"""Per-FedAvg, first-order (Fallah et al., 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach").

FedAvg's global model is trained to be a good starting point for one step of local
adaptation. Each local step of client ``k`` takes the next two batches ``D`` and ``D'``
of its local epochs (in the loader's order, epochs one after another; a last odd batch
serves as both): an inner step
``w' = w - alpha grad f(w; D)``, then the outer step ``w <- w - beta grad f(w'; D')`` (the
first-order variant: the gradient at ``w'`` is applied at ``w``, with no Hessian term).
The client sends ``delta_k = w - x``; the server is FedAvg's. A client is judged after one
step of adaptation: ``v_k = x - alpha grad f(x; D_k)`` on one batch of its training data
(:meth:`PerFedAvg.adapt`), on its own test split.

``beta`` is the local learning rate ``lr``. Not vectorizable: each step runs two passes
at two points.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from emberfl.algorithms.base import Client, ClientResult, Tree, check_positive, iter_epochs
from emberfl.algorithms.local_sgd import LocalSGD
from emberfl.nn import prepare_dropout

__all__ = ["PerFedAvg"]


def _pairs(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Yield consecutive batches two by two; a last odd batch is paired with itself."""
    for first in batches:
        second = next(batches, None)
        yield first, first if second is None else second


class PerFedAvg(LocalSGD):
    """MAML-style FedAvg, first-order: the global model is trained to adapt in one step.

    Attributes:
        alpha: The inner (adaptation) step size.
    """

    name: ClassVar[str] = "perfedavg"
    summary: ClassVar[str] = "Per-FedAvg, first-order: a global model that adapts in one step"
    vectorizable: ClassVar[bool] = False
    local_dp: ClassVar[bool] = False  # its own two-pass steps are not DP-SGD steps
    personalised: ClassVar[bool] = True
    adapts: ClassVar[bool] = True
    # The steps are the paper's plain SGD steps.
    optimizers: ClassVar[tuple[str, ...]] = ("sgd",)

    def __init__(self, *, lr: float, alpha: float = 0.01, **kwargs: Any) -> None:
        """Set the hyper-parameters.

        Args:
            lr: The outer step size ``beta`` (> 0).
            alpha: The inner step size (> 0).
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s ``epochs`` and
                ``server_lr`` (the steps are plain SGD: no momentum or weight decay).

        Raises:
            ConfigError: For a value out of range, momentum or weight decay.
        """
        super().__init__(lr=lr, **kwargs)
        from emberfl.errors import ConfigError

        if self.momentum or self.weight_decay:
            raise ConfigError("Per-FedAvg's steps are plain SGD: no momentum or weight_decay")
        self.alpha = check_positive("alpha", alpha)

    def client_update(self, client: Client) -> ClientResult:
        """Run the first-order MAML steps from the global model; send ``w - x``."""
        client.load_global()
        model = client.model
        model.train()
        prepare_dropout(model, client.dropout_generator)
        device = client.device
        params: Tree = {n: p for n, p in model.named_parameters() if p.requires_grad}
        x = client.broadcast["model"]
        criterion = nn.CrossEntropyLoss()
        loss_sum, steps = 0.0, 0
        batches = iter_epochs(client, self.local_epochs(client))
        for (d, t), (d2, t2) in _pairs(batches):
            if client.stopped():
                break
            saved = {n: p.detach().clone() for n, p in params.items()}
            self._sgd_step(model, params, criterion, d.to(device), t.to(device), self.alpha)
            loss = self._gradients(model, params, criterion, d2.to(device), t2.to(device))
            with torch.no_grad():
                for n, p in params.items():
                    grad = p.grad
                    p.copy_(saved[n])
                    if grad is not None:
                        p.sub_(grad, alpha=self.lr)
            loss_sum += loss
            steps += 1
        metrics = {"steps": float(steps)}
        if steps:
            metrics["train_loss"] = loss_sum / steps
        return ClientResult(
            uplink={"delta": client.flat_model() - x},
            num_samples=client.num_samples,
            metrics=metrics,
        )

    @staticmethod
    def _gradients(
        model: nn.Module,
        params: Tree,
        criterion: nn.Module,
        data: torch.Tensor,
        target: torch.Tensor,
    ) -> float:
        for p in params.values():
            p.grad = None
        loss = criterion(model(data), target)
        loss.backward()
        return float(loss.detach())

    def _sgd_step(
        self,
        model: nn.Module,
        params: Tree,
        criterion: nn.Module,
        data: torch.Tensor,
        target: torch.Tensor,
        step: float,
    ) -> None:
        self._gradients(model, params, criterion, data, target)
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p.sub_(p.grad, alpha=step)

    def adapt(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Adapt ``model`` (the global model, in place) with one step of size ``alpha``
        on ``batch``, as a client is judged."""
        params: Tree = {n: p for n, p in model.named_parameters() if p.requires_grad}
        device = next(iter(params.values())).device
        model.eval()  # deterministic: no dropout masks, BatchNorm's running statistics
        data, target = batch
        self._sgd_step(
            model, params, nn.CrossEntropyLoss(), data.to(device), target.to(device), self.alpha
        )
