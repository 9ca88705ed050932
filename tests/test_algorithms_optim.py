"""Server optimisers and local objectives against their papers' equations.

FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx, SCAFFOLD (option II), FedDyn and FedNova:

* identities the papers state (FedProx with mu = 0 is FedAvg bit for bit; FedAvgM with
  beta = 0 and FedNova with equal local steps are FedAvg; SCAFFOLD's first round is
  uniform-weight FedAvg), and that each regulariser or correction changes the update;
* a reference: two rounds on a tiny problem recomputed here from the equations with plain
  float64 tensors (mini-batch SGD in the loader's order, the server rules written out),
  matching within 1e-6 relative, server state included;
* the same bits in serial, thread and process mode at every parallelism, and the
  vectorized mode within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emberfl.algorithms import (
    ALGORITHMS,
    QFFL,
    Client,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedDyn,
    FedNova,
    FedProx,
    FedYogi,
    LocalSGD,
    ModelLayout,
    Scaffold,
    StreamSpec,
)
from emberfl.algorithms.fednova import normalizer
from emberfl.core import serialize_model
from emberfl.errors import ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.rng import Purpose
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 3
NUM_CLIENTS = 8
CIDS = [0, 2, 3, 6, 7]  # 5 of 8: partial participation (m / N matters)
BATCH = 4  # clients hold 4..8 samples: 1 or 2 steps per epoch
LR = 0.1


class OrderedData(LazyData):
    """LazyData read in order (no shuffling), so a plain loop sees the same batches."""

    def get_dataloader(
        self,
        type_: Any,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        data = self.get_dataset(type_, cid)
        return torch.utils.data.DataLoader(data, batch_size=batch_size or len(data))


class UniformFedAvg(FedAvg):
    """FedAvg with a plain mean of the updates (what SCAFFOLD's first round is)."""

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        return {"delta": StreamSpec(layout.dim, "uniform")}


def _simulate(
    algorithm: Any,
    *,
    rounds: int = 2,
    mode: str = "serial",
    parallelism: int = 1,
    data: Any = None,
    batch_size: int = BATCH,
) -> Run:
    data = data or OrderedData(NUM_CLIENTS)
    setup = ClientSetup(data, linear_model(), batch_size=batch_size, seed=SEED)
    sim = Simulation(
        algorithm, make_executor(mode, setup, parallelism=parallelism), num_clients=NUM_CLIENTS
    )
    with sim:
        for _ in range(rounds):
            sim.run_round(CIDS)
        states = {}
        if sim.client_state is not None:
            states = {c: {k: v.clone() for k, v in sim.client_state.views(c).items()} for c in CIDS}
        return Run(sim.state.model.clone(), dict(sim.state.tensors), sim.state_tensors(), states)


@dataclass
class Run:
    """What a simulation ends with."""

    model: torch.Tensor
    tensors: dict[str, torch.Tensor]  # the server's own tensors
    all_tensors: dict[str, torch.Tensor]  # Simulation.state_tensors(): everything checkpointed
    states: dict[int, dict[str, torch.Tensor]]  # each sampled client's state


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float((a64 - b64).abs().max() / b64.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------
# The reference: plain float64 tensors, written from the equations
# ------------------------------------------------------------------------------------------

SHAPES = [(8, 4), (8,), (3, 8), (3,)]  # linear_model's state_dict order


def _forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    parts, start = [], 0
    for shape in SHAPES:
        n = int(torch.Size(shape).numel())
        parts.append(w[start : start + n].view(shape))
        start += n
    w0, b0, w1, b1 = parts
    return torch.tanh(x @ w0.T + b0) @ w1.T + b1


def _batches(cid: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = OrderedData(NUM_CLIENTS).get_dataset("train", cid).tensors
    for i in range(0, len(y), BATCH):
        yield x[i : i + BATCH].double(), y[i : i + BATCH]


def _n(cid: int) -> int:
    return len(OrderedData(NUM_CLIENTS).get_dataset("train", cid))


Hook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _local(
    x: torch.Tensor,
    cid: int,
    *,
    epochs: int = 1,
    hook: Hook | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Local mini-batch SGD (``torch.optim.SGD``'s rule); returns ``y_k`` and ``tau_k``."""
    w, buf, steps = x.clone(), None, 0
    for _ in range(epochs):
        for bx, by in _batches(cid):
            live = w.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(_forward(live, bx), by), live)
            if hook is not None:
                g = hook(g, w)
            d = g + weight_decay * w
            if momentum:
                buf = d.clone() if buf is None else momentum * buf + d
                d = buf
            w = w - LR * d
            steps += 1
    return w, steps


def _x0() -> torch.Tensor:
    return serialize_model(linear_model()).to(torch.float64)


def _weights() -> dict[int, float]:
    total = sum(_n(c) for c in CIDS)
    return {c: _n(c) / total for c in CIDS}


def _fedavg_delta(x: torch.Tensor, **local: Any) -> torch.Tensor:
    w = _weights()
    return sum((w[c] * (_local(x, c, **local)[0] - x) for c in CIDS), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------
# Identities
# ------------------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit() -> None:
    a = _simulate(FedProx(lr=LR, epochs=2, mu=0.0)).model
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert torch.equal(_bits(a), _bits(b))


def test_fedavgm_without_momentum_is_fedavg() -> None:
    a = _simulate(FedAvgM(lr=LR, epochs=2, server_momentum=0.0)).model
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert _rel(a, b) <= 1e-6


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_with_equal_local_steps_is_fedavg(momentum: float) -> None:
    data = LazyData(NUM_CLIENTS)  # batch 16 >= every client's data: 2 steps each
    a = _simulate(FedNova(lr=LR, epochs=2, momentum=momentum), data=data, batch_size=16)
    b = _simulate(FedAvg(lr=LR, epochs=2, momentum=momentum), data=data, batch_size=16)
    assert _rel(a.model, b.model) <= 1e-6


def test_fednova_differs_from_fedavg_when_local_work_differs() -> None:
    a = _simulate(FedNova(lr=LR, epochs=2)).model  # 2 or 4 steps per client
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert _rel(a, b) > 1e-3


def test_scaffold_first_round_is_uniform_fedavg() -> None:
    a = _simulate(Scaffold(lr=LR, epochs=2), rounds=1).model
    b = _simulate(UniformFedAvg(lr=LR, epochs=2), rounds=1).model
    assert _rel(a, b) <= 1e-6


def test_fedprox_term_changes_the_update() -> None:
    a = _simulate(FedProx(lr=LR, epochs=2, mu=1.0), rounds=1).model
    b = _simulate(FedAvg(lr=LR, epochs=2), rounds=1).model
    assert _rel(a - _x0().float(), b - _x0().float()) > 1e-3


def test_scaffold_correction_changes_the_update() -> None:
    # c = c_k = 0 in round 1 (see above); from round 2 the correction is applied.
    a = _simulate(Scaffold(lr=LR, epochs=2), rounds=2).model
    b = _simulate(UniformFedAvg(lr=LR, epochs=2), rounds=2).model
    assert _rel(a, b) > 1e-4


def test_feddyn_regulariser_changes_the_local_update() -> None:
    alpha = 0.5
    sim = _simulate(FedDyn(lr=LR, epochs=2, alpha=alpha), rounds=1)
    x = _x0()
    for c in CIDS:
        # The state after round 1 is -alpha (y_k - x): the client's own trained model.
        y_k = x - sim.states[c]["grad"].to(torch.float64) / alpha
        plain, _ = _local(x, c, epochs=2)
        regularised, _ = _local(x, c, epochs=2, hook=lambda g, w: g + alpha * (w - x))
        assert _rel(y_k, regularised) <= 1e-6, c
        assert _rel(y_k - x, plain - x) > 1e-3, c


# ------------------------------------------------------------------------------------------
# References: two rounds recomputed from the equations
# ------------------------------------------------------------------------------------------


def test_fedavgm_reference() -> None:
    beta, eta_g = 0.9, 0.8
    sim = _simulate(FedAvgM(lr=LR, server_momentum=beta, server_lr=eta_g))
    x, v = _x0(), torch.zeros_like(_x0())
    for _ in range(2):
        v = beta * v + _fedavg_delta(x)
        x = x + eta_g * v
    assert _rel(sim.model, x) <= 1e-6
    assert _rel(sim.tensors["server_momentum"], v) <= 1e-6


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_fedopt_reference(cls: type[FedAdam]) -> None:
    eta_g, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    sim = _simulate(cls(lr=LR, server_lr=eta_g, beta1=b1, beta2=b2, tau=tau), rounds=3)
    x = _x0()
    m, v = torch.zeros_like(x), torch.full_like(x, tau**2)
    for _ in range(3):
        d = _fedavg_delta(x)
        m = b1 * m + (1 - b1) * d
        if cls is FedAdagrad:
            v = v + d**2
        elif cls is FedAdam:
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * torch.sign(v - d**2)
        x = x + eta_g * m / (v.sqrt() + tau)
    assert _rel(sim.model, x) <= 1e-6
    assert _rel(sim.tensors["server_m"], m) <= 1e-6
    assert _rel(sim.tensors["server_v"], v) <= 1e-6


def test_fedprox_reference() -> None:
    mu = 0.5
    sim = _simulate(FedProx(lr=LR, epochs=2, mu=mu, momentum=0.5, weight_decay=1e-3))
    x = _x0()
    for _ in range(2):
        x0 = x
        x = x + _fedavg_delta(
            x,
            epochs=2,
            hook=lambda g, w, x0=x0: g + mu * (w - x0),
            momentum=0.5,
            weight_decay=1e-3,
        )
    assert _rel(sim.model, x) <= 1e-6


def test_scaffold_reference() -> None:
    eta_g = 0.9
    sim = _simulate(Scaffold(lr=LR, epochs=2, server_lr=eta_g), rounds=3)
    x = _x0()
    c = torch.zeros_like(x)
    ck = {k: torch.zeros_like(x) for k in range(NUM_CLIENTS)}
    for _ in range(3):
        deltas, dcs = [], []
        for k in CIDS:
            correction = c - ck[k]
            y, tau = _local(x, k, epochs=2, hook=lambda g, w, d=correction: g + d)
            new = ck[k] - c + (x - y) / (tau * LR)
            deltas.append(y - x)
            dcs.append(new - ck[k])
            ck[k] = new
        x = x + eta_g * torch.stack(deltas).mean(0)
        c = c + len(CIDS) / NUM_CLIENTS * torch.stack(dcs).mean(0)
    assert _rel(sim.model, x) <= 1e-6
    assert _rel(sim.tensors["c"], c) <= 1e-6
    for k in CIDS:
        # c_k = (x - y_k) / (tau eta) cancels nearly equal float32 numbers: a few float32
        # roundings of x, relative to |x - y_k|, is its precision.
        assert _rel(sim.states[k]["c"], ck[k]) <= 5e-6, k


def test_feddyn_reference() -> None:
    alpha = 0.3
    sim = _simulate(FedDyn(lr=LR, epochs=2, alpha=alpha), rounds=3)
    x = _x0()
    h = torch.zeros_like(x)
    gk = {k: torch.zeros_like(x) for k in range(NUM_CLIENTS)}
    for _ in range(3):
        ys = []
        for k in CIDS:
            y, _ = _local(
                x,
                k,
                epochs=2,
                hook=lambda g, w, k=k, x0=x: g - gk[k] + alpha * (w - x0),
            )
            gk[k] = gk[k] - alpha * (y - x)
            ys.append(y)
        h = h - alpha / NUM_CLIENTS * sum((y - x for y in ys), torch.zeros_like(x))
        x = torch.stack(ys).mean(0) - h / alpha
    assert _rel(sim.model, x) <= 1e-6
    assert _rel(sim.tensors["h"], h) <= 1e-6
    for k in CIDS:
        assert _rel(sim.states[k]["grad"], gk[k]) <= 1e-6, k


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_reference(momentum: float) -> None:
    eta_g = 1.0
    sim = _simulate(FedNova(lr=LR, epochs=2, momentum=momentum, server_lr=eta_g))
    x = _x0()
    w = _weights()
    for _ in range(2):
        d_sum, tau_eff = torch.zeros_like(x), 0.0
        for k in CIDS:
            y, tau = _local(x, k, epochs=2, momentum=momentum)
            a = float(sum((1 - momentum ** (i + 1)) / (1 - momentum) for i in range(tau)))
            d_sum += w[k] * (y - x) / a
            tau_eff += w[k] * a
        x = x + eta_g * tau_eff * d_sum
    assert _rel(sim.model, x) <= 1e-6


# ------------------------------------------------------------------------------------------
# Heterogeneous local work (stragglers)
# ------------------------------------------------------------------------------------------


def _straggler_epochs(cid: int, rnd: int, epochs: int, fraction: float) -> int:
    """A straggler's epochs, drawn independently of emberfl from numpy's Philox on the
    stream ``(SEED, LOCAL_WORK, cid, rnd)``."""
    g = np.random.Generator(
        np.random.Philox(key=[SEED, int(Purpose.LOCAL_WORK)], counter=[0, cid, rnd, 0])
    )
    u = g.random(2)
    return epochs if u[0] >= fraction else 1 + int(u[1] * epochs)


def test_stragglers_run_fewer_epochs_drawn_from_their_own_stream() -> None:
    algorithm = FedAvg(lr=LR, epochs=4, stragglers=0.5)
    drawn = []
    for rnd in range(3):
        for cid in range(NUM_CLIENTS):
            client = Client(
                cid=cid, round=rnd, seed=SEED, device="cpu", model=linear_model(),
                layout=ModelLayout.of(linear_model()), broadcast={}, state={},
                state_is_new=True, loader_factory=lambda *_: None,  # type: ignore[arg-type,return-value]
                num_samples=_n(cid),
            )  # fmt: skip
            epochs = algorithm.local_epochs(client)
            assert epochs == _straggler_epochs(cid, rnd, 4, 0.5), (cid, rnd)
            drawn.append(epochs)
    assert min(drawn) >= 1 and max(drawn) == 4
    assert 0 < sum(e < 4 for e in drawn) < len(drawn)  # some stragglers, not all
    assert FedAvg(lr=LR, epochs=4).local_epochs(client) == 4  # no stragglers: no draw
    with pytest.raises(ConfigError, match=r"stragglers must be a fraction in \[0, 1\]"):
        FedAvg(lr=LR, stragglers=1.5)


def test_fednova_reference_with_stragglers() -> None:
    """FedNova with local work that differs by design: each client's tau_k from its draw."""
    sim = _simulate(FedNova(lr=LR, epochs=3, stragglers=1.0))
    x = _x0()
    w = _weights()
    steps = set()
    for rnd in range(2):
        d_sum, tau_eff = torch.zeros_like(x), 0.0
        for k in CIDS:
            y, tau = _local(x, k, epochs=_straggler_epochs(k, rnd, 3, 1.0))
            steps.add(tau)
            d_sum += w[k] * (y - x) / tau
            tau_eff += w[k] * tau
        x = x + tau_eff * d_sum
    assert len(steps) > 1  # the work did differ
    assert _rel(sim.model, x) <= 1e-6
    # FedAvg on the same stragglers differs from FedNova (the normalisation matters).
    assert _rel(_simulate(FedAvg(lr=LR, epochs=3, stragglers=1.0)).model, x) > 1e-4


def test_dropped_stragglers_are_left_out_of_the_round() -> None:
    """FedAvg that drops stragglers is FedAvg on the clients that finish, bit for bit."""
    epochs, fraction = 3, 0.6
    dropping = FedAvg(lr=LR, epochs=epochs, stragglers=fraction, drop_stragglers=True)
    setup = ClientSetup(OrderedData(NUM_CLIENTS), linear_model(), batch_size=BATCH, seed=SEED)
    plain_setup = ClientSetup(OrderedData(NUM_CLIENTS), linear_model(), batch_size=BATCH, seed=SEED)
    dropped_total = 0
    with (
        Simulation(dropping, make_executor("serial", setup), num_clients=NUM_CLIENTS) as sim,
        Simulation(
            FedAvg(lr=LR, epochs=epochs), make_executor("serial", plain_setup),
            num_clients=NUM_CLIENTS,
        ) as plain,
    ):  # fmt: skip
        for rnd in range(3):
            finishing = [c for c in CIDS if _straggler_epochs(c, rnd, epochs, fraction) == epochs]
            metrics = sim.run_round(CIDS)
            plain.run_round(finishing)
            assert metrics["num_clients"] == len(finishing)
            assert metrics.get("dropped_clients", 0) == len(CIDS) - len(finishing)
            dropped_total += len(CIDS) - len(finishing)
            assert torch.equal(sim.state.model, plain.state.model), rnd
        assert dropped_total > 0
        # A round in which every sampled client drops passes without an update.
        rnd = sim.round
        late = [c for c in range(NUM_CLIENTS) if _straggler_epochs(c, rnd, epochs, fraction) < 3]
        before = sim.state.model.clone()
        metrics = sim.run_round(late[:2])
        assert metrics == {
            "num_clients": 0.0,
            "num_samples": 0.0,
            "uplink_bytes": 0.0,
            "downlink_bytes": 0.0,
            "dropped_clients": 2.0,
        }
        assert torch.equal(sim.state.model, before) and sim.round == rnd + 1
    with pytest.raises(ConfigError, match="drop_stragglers needs stragglers > 0"):
        FedAvg(lr=LR, drop_stragglers=True)


def test_fednova_normalizer_closed_form() -> None:
    steps = torch.arange(0, 12)
    for rho in (0.0, 0.5, 0.9):
        direct = [
            sum((1 - rho ** (i + 1)) / (1 - rho) for i in range(int(t))) for t in steps.tolist()
        ]
        assert torch.allclose(
            normalizer(steps, rho), torch.tensor(direct, dtype=torch.float64), rtol=1e-12
        )


def test_qffl_with_q_zero_is_uniform_fedavg() -> None:
    a = _simulate(QFFL(lr=LR, epochs=2, q=0.0)).model
    b = _simulate(UniformFedAvg(lr=LR, epochs=2)).model
    assert _rel(a, b) <= 1e-6


@pytest.mark.parametrize("q", [0.5, 2.0])
def test_qffl_reference(q: float) -> None:
    sim = _simulate(QFFL(lr=LR, epochs=2, q=q))
    x = _x0()
    big_l = 1 / LR
    for _ in range(2):
        deltas, hs = [], []
        for k in CIDS:
            bx, by = OrderedData(NUM_CLIENTS).get_dataset("train", k).tensors
            loss = float(F.cross_entropy(_forward(x, bx.double()), by))  # F_k at x
            y, _ = _local(x, k, epochs=2)
            dw = big_l * (x - y)
            deltas.append(loss**q * dw)
            hs.append(q * loss ** (q - 1) * float(dw.square().sum()) + big_l * loss**q)
        x = x - torch.stack(deltas).sum(0) / sum(hs)
    assert _rel(sim.model, x) <= 1e-6


def test_qffl_refuses_a_server_lr_and_the_vectorized_mode() -> None:
    with pytest.raises(ConfigError, match="no server_lr"):
        QFFL(lr=LR, server_lr=0.5)
    with pytest.raises(ConfigError, match="no server_lr"):
        FedDyn(lr=LR, server_lr=0.5)
    with pytest.raises(ConfigError, match="cannot run it"):
        _simulate(QFFL(lr=LR), mode="vectorized")


# ------------------------------------------------------------------------------------------
# The local optimiser: Adam
# ------------------------------------------------------------------------------------------


def _torch_adam_client(
    x: torch.Tensor, cid: int, *, epochs: int, weight_decay: float
) -> torch.Tensor:
    """One client trained by ``torch.optim.Adam`` on the plain model, in the loader's order."""
    model = linear_model()
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            p.copy_(x[start : start + p.numel()].view_as(p))
            start += p.numel()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=weight_decay)
    for _ in range(epochs):
        for bx, by in _batches(cid):
            opt.zero_grad()
            F.cross_entropy(model(bx.float()), by).backward()
            opt.step()
    return serialize_model(model).to(torch.float64)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_is_torch_adam(weight_decay: float) -> None:
    got = _simulate(
        FedAvg(lr=0.01, epochs=3, optimizer="adam", weight_decay=weight_decay), rounds=1
    ).model
    x = _x0().float()
    w = _weights()
    expected = sum(
        (w[c] * _torch_adam_client(x, c, epochs=3, weight_decay=weight_decay) for c in CIDS),
        torch.zeros(x.shape, dtype=torch.float64),
    )
    assert _rel(got, expected) <= 1e-6


def test_adam_in_every_mode() -> None:
    data = LazyData(NUM_CLIENTS)  # 1 to 3 steps per epoch: the vectorized masks are used

    def make() -> FedProx:
        return FedProx(lr=0.01, epochs=2, mu=0.1, optimizer="adam")

    reference = _simulate(make(), data=data, batch_size=3)
    for mode, p in [("thread", 2), ("process", 2)]:
        got = _simulate(make(), mode=mode, parallelism=p, data=data, batch_size=3)
        assert torch.equal(_bits(got.model), _bits(reference.model)), mode
    for p in (1, 2):
        got = _simulate(make(), mode="vectorized", parallelism=p, data=data, batch_size=3)
        assert _rel(got.model, reference.model) <= 1e-5, p


def test_adam_where_the_equations_assume_sgd_is_refused() -> None:
    for cls in (FedNova, Scaffold, QFFL):
        with pytest.raises(ConfigError, match="its equations assume SGD steps"):
            cls(lr=LR, optimizer="adam")
    with pytest.raises(ConfigError, match="momentum is SGD's"):
        FedAvg(lr=LR, optimizer="adam", momentum=0.9)
    with pytest.raises(ConfigError, match="takes optimizer 'sgd' or 'adam', got 'rmsprop'"):
        FedAvg(lr=LR, optimizer="rmsprop")


# ------------------------------------------------------------------------------------------
# Every mode, every parallelism
# ------------------------------------------------------------------------------------------

MAKERS: dict[str, Callable[[], LocalSGD]] = {
    "fedavgm": lambda: FedAvgM(lr=LR, epochs=2),
    "fedadagrad": lambda: FedAdagrad(lr=LR),
    "fedadam": lambda: FedAdam(lr=LR, epochs=2),
    "fedyogi": lambda: FedYogi(lr=LR),
    "fedprox": lambda: FedProx(lr=LR, epochs=2, mu=0.1),
    "scaffold": lambda: Scaffold(lr=LR, epochs=2),
    "feddyn": lambda: FedDyn(lr=LR, epochs=2, alpha=0.1),
    "fednova": lambda: FedNova(lr=LR, epochs=2, momentum=0.5),
    "qffl": lambda: QFFL(lr=LR, epochs=2, q=1.0),
    "fedprox-stragglers": lambda: FedProx(lr=LR, epochs=3, mu=0.1, stragglers=0.6),
}


def test_every_algorithm_is_in_the_cli_table() -> None:
    names = {name.split("-")[0] for name in MAKERS}
    assert names | {"fedavg"} <= set(ALGORITHMS)
    for name, make in MAKERS.items():
        assert ALGORITHMS[name.split("-")[0]] is type(make())
        assert ALGORITHMS[name.split("-")[0]].summary


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_same_bits_in_every_mode_and_vectorized_close(name: str) -> None:
    make = MAKERS[name]
    data = LazyData(NUM_CLIENTS)  # shuffled batches: each client's own stream
    reference = _simulate(make(), data=data)
    ref_tensors = reference.all_tensors
    for mode, p in [("thread", 1), ("thread", 2), ("thread", 4), ("process", 1), ("process", 2),
                    ("process", 4)]:  # fmt: skip
        sim = _simulate(make(), mode=mode, parallelism=p, data=data)
        tensors = sim.all_tensors
        assert tensors.keys() == ref_tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(value, ref_tensors[key]), (mode, p, key)
    if not make().vectorizable:
        return
    for p in (1, 2):
        sim = _simulate(make(), mode="vectorized", parallelism=p, data=data)
        assert _rel(sim.model, reference.model) <= 1e-5, p


def test_bad_hyper_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="server_momentum must be < 1"):
        FedAvgM(lr=LR, server_momentum=1.0)
    with pytest.raises(ConfigError, match="beta2 must be >= 0"):
        FedAdam(lr=LR, beta2=-0.1)
    with pytest.raises(ConfigError, match="tau must be > 0"):
        FedYogi(lr=LR, tau=0.0)
    with pytest.raises(ConfigError, match="mu must be >= 0"):
        FedProx(lr=LR, mu=-1.0)
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        FedDyn(lr=LR, alpha=0.0)
