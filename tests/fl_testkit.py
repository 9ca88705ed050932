"""Small data sets, models and algorithms for the algorithm-layer tests.

Module-level (not inside test functions) so that worker processes can unpickle them.
The algorithms here are test doubles written the way a user would write one; the
equations they follow are recomputed independently in the tests.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.algorithms import (
    Aggregate,
    Algorithm,
    Client,
    ClientResult,
    ClientUpdate,
    FedAvg,
    LocalResult,
    LocalSGD,
    ModelLayout,
    ServerState,
    StreamSpec,
    Terms,
    Tree,
)
from emberfl.algorithms.scaffold import Scaffold

FEATURES = 4
CLASSES = 3


class LazyData:
    """Client ``k`` holds ``4 + k % 5`` samples drawn from a generator seeded with ``k``.

    Nothing is stored: a client's data is rebuilt when asked for, so a population of
    10,000 clients costs nothing until they train. Labels are skewed per client.
    """

    def __init__(self, num_clients: int, *, image: bool = False) -> None:
        self.num_clients = num_clients
        self.image = image

    def _client(self, cid: int) -> TensorDataset:
        g = torch.Generator().manual_seed(1000 + cid)
        n = 4 + cid % 5
        shape = (n, 1, 6, 6) if self.image else (n, FEATURES)
        x = torch.randn(*shape, generator=g) + 0.3 * (cid % CLASSES)
        y = (torch.arange(n) + cid) % CLASSES
        return TensorDataset(x, y)

    def get_dataset(self, type_: Any, cid: int | None) -> TensorDataset:
        if cid is None or type_ == "test":
            return self._client(10_000_000)
        return self._client(cid)

    def get_dataloader(
        self,
        type_: Any,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        data = self.get_dataset(type_, cid)
        return DataLoader(
            data,
            batch_size=batch_size or len(data),
            shuffle=type_ == "train" and cid is not None,
            generator=generator,
        )


class BrokenData(LazyData):
    """Client 3's loader raises."""

    def get_dataloader(self, type_: Any, cid: int | None, *args: Any, **kw: Any) -> Any:
        if cid == 3:
            raise RuntimeError("disk on fire")
        return super().get_dataloader(type_, cid, *args, **kw)


def linear_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def conv_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES)
        )


class Prox(LocalSGD):
    """FedProx's local objective: ``f_k(w) + mu/2 ||w - x||^2`` as a loss term."""

    name: ClassVar[str] = "prox-test"

    def __init__(self, *, mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mu = mu

    def loss_term(self, params: Tree, terms: Terms) -> torch.Tensor | None:
        total = sum(((p - terms.global_params[n]) ** 2).sum() for n, p in params.items())
        return 0.5 * self.mu * total  # type: ignore[return-value]


class ControlVariates(Scaffold):
    """SCAFFOLD, option II: emberfl's own (the layer tests recompute it from the paper)."""

    name: ClassVar[str] = "scaffold-test"


class Distill(Algorithm):
    """A DS-FL-like distillation algorithm through the general hook (not local SGD).

    Each client keeps its own model in its state, trains it on its private data and
    uploads its softmax predictions on a public batch; the server averages them, sharpens
    them with a temperature (entropy-reduction averaging) and broadcasts them; clients
    first distil towards the last broadcast. No model parameter goes up.
    """

    name: ClassVar[str] = "distill-test"

    def __init__(self, public: torch.Tensor, *, lr: float = 0.1, temperature: float = 0.5):
        self.public = public
        self.lr = lr
        self.temperature = temperature

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        return {"soft": StreamSpec(self.public.shape[0] * CLASSES, "uniform")}

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        return {"own": layout.dim}

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        state = super().init_server(model, layout)
        state.tensors["soft"] = torch.full((self.public.shape[0] * CLASSES,), 1.0 / CLASSES)
        return state

    def broadcast(self, state: ServerState) -> dict[str, torch.Tensor]:
        return {"model": state.model, "soft": state.tensors["soft"]}

    def client_update(self, client: Client) -> ClientResult:
        from emberfl.core import deserialize_model, serialize_model

        model = client.model
        own = client.state["own"]
        deserialize_model(model, client.broadcast["model"] if client.state_is_new else own)
        params = [p for p in model.parameters() if p.requires_grad]
        target = client.broadcast["soft"].view(-1, CLASSES)
        for _ in range(2):  # distil towards the broadcast
            loss = F.kl_div(F.log_softmax(model(self.public), 1), target, reduction="batchmean")
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(self.lr * g)
        for x, y in client.loader():
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(self.lr * g)
        own.copy_(serialize_model(model))
        with torch.no_grad():
            soft = F.softmax(model(self.public), 1).reshape(-1)
        return ClientResult(uplink={"soft": soft}, num_samples=client.num_samples)

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        mean = aggregate.mean("soft").view(-1, CLASSES)
        sharp = F.softmax(mean.log() / self.temperature, dim=1)
        state.tensors["soft"].copy_(sharp.reshape(-1))


class WrongShape(FedAvg):
    """Sends a truncated update."""

    def finish(self, result: LocalResult) -> ClientUpdate:
        delta = result.model - result.global_model
        return ClientUpdate(uplink={"delta": delta[..., :5]})


class WrongState(FedAvg):
    """Declares a 3-element state and writes 7 elements into it."""

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        return {"s": 3}

    def finish(self, result: LocalResult) -> ClientUpdate:
        update = super().finish(result)
        lead = result.model.shape[:-1]
        update.state = {"s": torch.ones(*lead, 7)}
        return update


class Diverges(FedAvg):
    """Client 2's update holds NaN in the last layer's bias."""

    def client_update(self, client: Client) -> ClientResult:
        result = super().client_update(client)
        if client.cid == 2:
            result.uplink["delta"][-1] = float("nan")
        return result


class HangingData(LazyData):
    """Client ``hang_cid``'s loader never returns, deaf to stop requests, while ``flag``
    exists (a stuck network file system, a deadlocked data pipeline)."""

    def __init__(self, num_clients: int, *, hang_cid: int, flag: str) -> None:
        super().__init__(num_clients)
        self.hang_cid = hang_cid
        self.flag = flag

    def get_dataloader(self, type_: Any, cid: int | None, *args: Any, **kw: Any) -> Any:
        if cid == self.hang_cid:
            while os.path.exists(self.flag):
                time.sleep(0.01)
        return super().get_dataloader(type_, cid, *args, **kw)


class WritesBroadcast(FedAvg):
    """Client ``writer`` adds 1 to the global model it was sent, in place."""

    def __init__(self, *, writer: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writer = writer

    def client_update(self, client: Client) -> ClientResult:
        if client.cid == self.writer:
            with torch.no_grad():
                client.broadcast["model"].add_(1.0)
        return super().client_update(client)


def sigkill_after_checkpoint(argv: list[str], run_dir: Any, *, min_round: int = 2) -> int:
    """Run ``python -m emberfl run --output-dir RUN_DIR ARGV`` and SIGKILL it as soon as
    its checkpoint holds round ``min_round`` or later; return the checkpoint's round.

    Fails (an ``AssertionError``) if the run ends first or no such checkpoint appears in
    120 s.
    """
    import signal
    import subprocess
    import sys

    from emberfl.cli.checkpoint import load_checkpoint

    command = [sys.executable, "-m", "emberfl", "run", "--output-dir", str(run_dir), *argv]
    with subprocess.Popen(command, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    checkpoint = load_checkpoint(run_dir)
                except Exception:  # not written yet, or being written
                    checkpoint = None
                if checkpoint is not None and checkpoint.round >= min_round:
                    break
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
    stopped = load_checkpoint(run_dir)
    assert stopped is not None
    return stopped.round
