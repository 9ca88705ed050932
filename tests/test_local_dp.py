"""Local DP-SGD (``LocalSGD(dp=DPSGD(...))``) against plain per-sample loops.

sigma = 0 and C = infinity is FedAvg; a round equals the DP-SGD equation recomputed in
float64 with one backward pass per sample, clipping and the client's own noise stream;
the noise's empirical std is sigma C / B; the bits are the same in every per-client mode
and parallelism, and vectorized mode is within float rounding; terms without data
(FedProx's) stay outside the clipping; the reported epsilon is the accountant's for the
worst-off client; models and algorithms that cannot be made private are refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from emberfl.algorithms import QFFL, FedAvg, FedProx, PerFedAvg
from emberfl.errors import ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.privacy import DPSGD, epsilon, local_epsilon
from emberfl.rng import Purpose, stream
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 5
N = 4
LR = 0.3


def _run(algorithm: FedAvg, mode: str = "serial", p: int = 1, rounds: int = 1) -> torch.Tensor:
    setup = ClientSetup(LazyData(N), linear_model(), batch_size=16, seed=SEED)
    with Simulation(
        algorithm, make_executor(mode, setup, parallelism=p), num_clients=N, clients_per_round=N
    ) as sim:
        for _ in range(rounds):
            sim.run_round()
        return sim.state.model.clone()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()])


def test_no_noise_and_no_clipping_is_fedavg() -> None:
    plain = _run(FedAvg(lr=LR, epochs=2))
    private = _run(FedAvg(lr=LR, epochs=2, dp=DPSGD(0.0, math.inf)))
    assert float((private - plain).abs().max()) <= 1e-6 * float(plain.abs().max())


def _reference_delta(cid: int, sigma: float, clip: float) -> tuple[torch.Tensor, int]:
    """One DP-SGD step (each client's data is one batch) in float64, sample by sample."""
    data = LazyData(N)._client(cid)
    x, y = data.tensors
    model = copy.deepcopy(linear_model()).double()
    start = _flat(model)
    params = list(model.parameters())
    total = [torch.zeros_like(q) for q in params]
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1]).backward()
        grads = [q.grad.clone() for q in params]  # type: ignore[union-attr]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        scale = min(1.0, clip / (norm + 1e-6))
        total = [t + scale * g for t, g in zip(total, grads, strict=True)]
    draw = stream(SEED, purpose=Purpose.DP_SGD_NOISE, client=cid, round=0)
    generator = torch.Generator().manual_seed(draw.torch_seed())
    with torch.no_grad():
        for q, t in zip(params, total, strict=True):
            noise = torch.randn(q.shape, generator=generator, dtype=torch.float32).double()
            q -= LR * (t + sigma * clip * noise) / len(y)
    return _flat(model) - start, len(y)


@pytest.mark.parametrize(("sigma", "clip"), [(0.0, 0.05), (1.3, 0.5), (0.7, 50.0)])
def test_a_round_is_the_dp_sgd_equation(sigma: float, clip: float) -> None:
    got = _run(FedAvg(lr=LR, dp=DPSGD(sigma, clip))).double()
    deltas = [_reference_delta(cid, sigma, clip) for cid in range(N)]
    weight = sum(n for _, n in deltas)
    expected = _flat(linear_model()).double() + sum(d * n for d, n in deltas) / weight
    scale = float((expected - _flat(linear_model()).double()).abs().max())
    assert float((got - expected).abs().max()) <= 1e-6 * max(scale, 1.0)


def test_the_noise_std_is_sigma_c_over_the_batch() -> None:
    """With a tiny clip bound the step is all noise: delta = -lr * sigma C z / B."""
    sigma, clip = 2.0, 1e-6
    linear = nn.Linear(300, 200)  # 60,200 noise draws per client
    setup = ClientSetup(_Wide(), linear, batch_size=8, seed=SEED)
    with Simulation(
        FedAvg(lr=1.0, dp=DPSGD(sigma, clip)), make_executor("serial", setup),
        num_clients=1, clients_per_round=1,
    ) as sim:  # fmt: skip
        before = sim.state.model.clone()
        sim.run_round()
        delta = sim.state.model - before
    expected = sigma * clip / 8
    assert float(delta.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(delta.mean())) < 0.02 * expected


class _Wide(LazyData):
    """One client with eight 300-feature samples (one batch of 8)."""

    def __init__(self) -> None:
        super().__init__(1)

    def _client(self, cid: int) -> torch.utils.data.TensorDataset:
        g = torch.Generator().manual_seed(cid + 1)
        return torch.utils.data.TensorDataset(
            torch.randn(8, 300, generator=g), torch.arange(8) % 200
        )


@pytest.mark.timeout(300)
def test_the_same_bits_in_every_mode_and_parallelism() -> None:
    algorithm = FedAvg(lr=LR, epochs=2, dp=DPSGD(1.0, 0.5))
    reference = _run(algorithm, rounds=2)
    for mode, p in [("thread", 2), ("thread", 4), ("process", 2)]:
        assert torch.equal(_run(algorithm, mode, p, rounds=2), reference), (mode, p)


@pytest.mark.parametrize(
    "algorithm",
    [FedAvg(lr=LR, epochs=2, dp=DPSGD(1.0, 0.5)), FedProx(lr=LR, epochs=2, mu=0.3,
                                                         dp=DPSGD(0.7, 0.2))],
)  # fmt: skip
def test_vectorized_mode_is_the_same_dp_sgd_within_float_rounding(algorithm: FedAvg) -> None:
    """Clients of uneven sizes (4..8 samples, batches of 3): padding, clipping and each
    client's noise stream match the per-client loop."""

    def run(mode: str) -> torch.Tensor:
        setup = ClientSetup(LazyData(6), linear_model(), batch_size=3, seed=SEED)
        with Simulation(
            algorithm, make_executor(mode, setup, parallelism=2), num_clients=6,
            clients_per_round=6,
        ) as sim:  # fmt: skip
            for _ in range(2):
                sim.run_round()
            return sim.state.model.clone()

    serial, vectorized = run("serial"), run("vectorized")
    assert float((vectorized - serial).abs().max()) <= 1e-5 * float(serial.abs().max())
    start = _flat(linear_model())
    assert float((serial - start).abs().max()) > 1e-3  # it trained


def test_a_term_without_data_is_added_outside_the_clipping() -> None:
    """FedProx's pull is not clipped: with mu > 0 the update differs from mu = 0 by the
    proximal gradient, though every per-sample gradient is clipped to a tiny bound."""
    dp = DPSGD(0.0, 1e-9)
    fedavg = _run(FedAvg(lr=LR, epochs=3, dp=dp))
    prox = _run(FedProx(lr=LR, epochs=3, mu=0.0, dp=dp))
    assert torch.equal(prox, fedavg)
    start = _flat(linear_model())
    # With the data's gradient clipped away, the model barely moves, and the proximal term
    # (zero at the start) keeps it there: only rounding-level differences remain.
    assert float((fedavg - start).abs().max()) < 1e-6
    moved = _run(FedProx(lr=LR, epochs=3, mu=0.5, dp=DPSGD(0.0, 0.1)))
    still = _run(FedAvg(lr=LR, epochs=3, dp=DPSGD(0.0, 0.1)))
    assert float((moved - still).abs().max()) > 1e-4  # the proximal term changes the steps


def test_epsilon_is_the_accountants_for_the_worst_off_client() -> None:
    clients = [(0.25, 40), (0.5, 40), (0.1, 100), (1.0, 0)]
    expected = max(epsilon(1.1, q, t, 1e-5) for q, t in clients if t)
    assert local_epsilon(1.1, clients, 1e-5) == expected
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.1)), 40
        )
    )
    assert epsilon(1.1, 0.5, 40, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert local_epsilon(1.1, [(0.3, 0)], 1e-5) == 0.0


def test_models_and_algorithms_that_cannot_be_private_are_refused() -> None:
    dp = DPSGD(1.0, 1.0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        dp.check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ConfigError, match="dropout"):
        dp.check_model(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    for cls in (QFFL, PerFedAvg):
        with pytest.raises(ConfigError, match="cannot train with local DP-SGD"):
            cls(lr=0.1, dp=dp)
    with pytest.raises(ConfigError, match="dp_clip_norm must be > 0"):
        DPSGD(1.0, 0.0)
    with pytest.raises(ConfigError, match="noise needs a finite dp_clip_norm"):
        DPSGD(1.0, math.inf)
    with pytest.raises(ConfigError, match="dp_noise_multiplier must be >= 0"):
        DPSGD(-1.0, 1.0)
