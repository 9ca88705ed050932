"""Client-level differential privacy (DP-FedAvg) against its definition and the accountant.

Without noise or clipping the mechanism is uniform-weight FedAvg bit for bit; with a bound
it is the clipped sum over the fixed denominator, recomputed in float64; its noise has
the standard deviation sigma C / (q N) and comes from the round's stream; Poisson
sampling against numpy's Philox; the epsilon logged each round is dp-accounting's RDP
answer for the same (sigma, q, rounds, delta); the CLI's options, errors and resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from emberfl.aggregation import Mean, UpdateSet
from emberfl.algorithms import FedAvg, ModelLayout, StreamSpec
from emberfl.cli import main
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.executors import ClientSetup, make_executor
from emberfl.privacy import DPMean, epsilon, noise_for_epsilon
from emberfl.rng import Purpose
from emberfl.selection import select_poisson
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 7


def _set(x: torch.Tensor) -> UpdateSet:
    updates = UpdateSet(x.shape[0], x.shape[1])
    for i, row in enumerate(x):
        updates.add(row, float(i + 1), source=f"client {i}")  # weights DP must ignore
    return updates


def _combine(rule: DPMean | Mean, x: torch.Tensor, round_: int = 0) -> torch.Tensor:
    out = torch.empty(x.shape[1], dtype=torch.float32)
    with _set(x) as updates:
        rule.begin_round(SEED, round_)
        rule.combine(updates, out, num_threads=2)
    return out


def test_without_noise_or_clipping_it_is_the_uniform_mean_bit_for_bit() -> None:
    x = torch.randn(6, 500, generator=torch.Generator().manual_seed(0))
    dp = DPMean(noise_multiplier=0.0, clip_norm=math.inf, expected_clients=6, seed=SEED)
    with _set(x) as updates:
        uniform = torch.empty(500)
        from emberfl.aggregation import weighted_mean

        weighted_mean(updates.arena, range(6), [1.0] * 6, uniform)
    assert torch.equal(_combine(dp, x), uniform)


class UniformFedAvg(FedAvg):
    """FedAvg with a plain mean of the updates."""

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        return {"delta": StreamSpec(layout.dim, "uniform")}


def test_a_noiseless_unclipped_simulation_with_every_client_is_uniform_fedavg() -> None:
    def run(dp: bool) -> torch.Tensor:
        setup = ClientSetup(LazyData(8), linear_model(), batch_size=4, seed=SEED)
        options: dict[str, object] = {}
        if dp:
            options = {
                "aggregator": DPMean(
                    noise_multiplier=0.0, clip_norm=math.inf, expected_clients=8, seed=SEED
                ),
                "selection": "poisson",
            }
        algorithm = FedAvg(lr=0.1) if dp else UniformFedAvg(lr=0.1)
        with Simulation(algorithm, make_executor("serial", setup), num_clients=8, **options) as sim:  # type: ignore[arg-type]
            for _ in range(3):
                sim.run_round()
            return sim.state.model.clone()

    assert torch.equal(run(True), run(False))


def test_clipping_is_the_clipped_sum_over_the_fixed_denominator() -> None:
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    x[2] *= 40.0
    dp = DPMean(noise_multiplier=0.0, clip_norm=3.0, expected_clients=8.0, seed=SEED)
    out = _combine(dp, x).double()
    x64 = x.double()
    scale = (3.0 / x64.norm(dim=1)).clamp(max=1.0)
    expected = (scale[:, None] * x64).sum(0) / 8.0
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-6
    assert dp.last_clipped == int((x64.norm(dim=1) > 3.0).sum()) >= 1


def test_the_noise_has_std_sigma_c_over_the_expected_clients() -> None:
    d = 200_000
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(2)) * 1e-3
    sigma, c, expected = 1.3, 0.5, 10.0
    clean = _combine(
        DPMean(noise_multiplier=0.0, clip_norm=c, expected_clients=expected, seed=SEED), x
    )
    noisy = DPMean(noise_multiplier=sigma, clip_norm=c, expected_clients=expected, seed=SEED)
    noise = (_combine(noisy, x, round_=3) - clean).double()
    target = sigma * c / expected
    assert abs(float(noise.std()) / target - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(d)
    # The round's stream: the same round draws the same noise, another round other noise.
    assert torch.equal(_combine(noisy, x, round_=3), _combine(noisy, x, round_=3))
    assert not torch.equal(_combine(noisy, x, round_=4), _combine(noisy, x, round_=3))
    # An empty round is noise only.
    with UpdateSet(1, d) as empty:
        out = torch.empty(d)
        noisy.begin_round(SEED, 3)
        noisy.combine(empty, out, num_threads=1)
    assert torch.allclose(out, noise.float(), atol=1e-6)


def test_poisson_sampling_draws_each_client_from_the_round_stream() -> None:
    for round_ in range(5):
        u = np.random.Generator(
            np.random.Philox(key=[SEED, int(Purpose.CLIENT_SAMPLING)], counter=[0, 0, round_, 0])
        ).random(40)
        assert select_poisson(SEED, round_, 40, 0.25) == [int(c) for c in np.flatnonzero(u < 0.25)]
    sizes = [len(select_poisson(SEED, r, 40, 0.25)) for r in range(200)]
    assert abs(float(np.mean(sizes)) - 10) < 1.0 and len(set(sizes)) > 3


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 0.1, 100), (0.8, 0.5, 20), (3.0, 1.0, 7)])
def test_epsilon_is_the_rdp_accountants(sigma: float, q: float, rounds: int) -> None:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    assert epsilon(sigma, q, rounds, 1e-5) == accountant.get_epsilon(1e-5)
    assert epsilon(sigma, q, rounds + 1, 1e-5) > epsilon(sigma, q, rounds, 1e-5)
    assert epsilon(2 * sigma, q, rounds, 1e-5) < epsilon(sigma, q, rounds, 1e-5)
    assert epsilon(sigma, q, 0, 1e-5) == 0.0


TINY = ["--num-clients", "20", "--sample-ratio", "0.3", "--epochs", "1", "--batch-size", "16",
        "--train-size", "400", "--quiet"]  # fmt: skip


@pytest.mark.timeout(300)
def test_the_cli_logs_epsilon_every_round_and_resumes_bitwise(tmp_path: Path) -> None:
    options = [*TINY, "--dp", "central", "--dp-noise-multiplier", "0.9", "--dp-clip-norm", "2",
               "--dp-delta", "1e-4", "--checkpoint-every", "1"]  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", *options, "--rounds", "3", "--output-dir", str(whole)]) == 0
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["dp_epsilon"] == epsilon(0.9, 6 / 20, row["round"], 1e-4)
    assert len({r["num_clients"] for r in rows}) >= 1
    assert main(["run", *options, "--rounds", "2", "--output-dir", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "3", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    thread = tmp_path / "thread"
    argv = [*options, "--rounds", "3", "--mode", "thread", "--parallelism", "2"]
    assert main(["run", *argv, "--output-dir", str(thread)]) == 0
    assert (thread / "final_model.safetensors").read_bytes() == model  # noise independent of P


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-noise-multiplier", "1"], "is an option of dp 'central'"),
        (["--dp", "central", "--dp-delta", "1"], "dp_delta must be in (0, 1)"),
        (["--dp", "central", "--dp-noise-multiplier", "0"], "dp_noise_multiplier must be a pos"),
        (["--dp", "central", "--dp-clip-norm", "-1"], "dp_clip_norm must be a positive"),
        (["--dp", "central", "--aggregator", "krum"], "does not combine with aggregator 'krum'"),
        (["--dp", "central", "--client-selection", "size"], "cannot be used with it"),
        (["--dp", "central", "--algorithm", "scaffold"], "algorithm 'scaffold' sends 2"),
        (["--dp", "local", "--dp-target-epsilon", "3"], "is an option of dp 'central'"),
        (["--dp-target-epsilon", "3"], "is an option of dp 'central'"),
        (
            ["--dp", "central", "--dp-target-epsilon", "3", "--dp-noise-multiplier", "1"],
            "drop dp_noise_multiplier",
        ),
        (["--dp", "central", "--dp-target-epsilon", "-1"], "dp_target_epsilon must be a pos"),
        (["--dp", "central", "--dp-target-epsilon", "1e-5"], "is unreachable"),
        (["--dp-adaptive-clip-quantile", "0.5"], "is an option of dp 'central'"),
        (["--dp", "central", "--dp-adaptive-clip-quantile", "1.5"], "quantile must be in (0, 1)"),
        (
            [
                "--dp",
                "central",
                "--dp-adaptive-clip-quantile",
                "0.5",
                "--num-clients",
                "20",
                "--dp-noise-multiplier",
                "1",
            ],
            "must exceed noise_multiplier / 2",
        ),
    ],
)
def test_bad_privacy_options_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", *argv, "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_every_privacy_option_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dp ", "--dp-noise-multiplier", "--dp-clip-norm", "--dp-delta",
                 "--dp-adaptive-clip-quantile"):  # fmt: skip
        assert flag in text, flag


# ------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al., 2021)
# ------------------------------------------------------------------------------------------


def test_adaptive_clipping_moves_the_bound_by_the_unclipped_fraction() -> None:
    x = torch.randn(10, 100, generator=torch.Generator().manual_seed(3))
    x *= torch.linspace(0.5, 5.0, 10)[:, None]  # norms spread from about 5 to 50
    norms = x.double().norm(dim=1)
    dp = DPMean(noise_multiplier=0.0, clip_norm=20.0, expected_clients=10.0, seed=SEED,
                target_quantile=0.5, clip_lr=0.2)  # fmt: skip
    c = 20.0
    for round_ in range(3):
        _combine(dp, x, round_)
        fraction = float((norms <= c).sum()) / 10.0
        c *= math.exp(-0.2 * (fraction - 0.5))
        assert dp.clip_norm == pytest.approx(c, rel=1e-12)
    for round_ in range(3, 400):  # the bound settles at the median norm
        _combine(dp, x, round_)
    sorted_norms = sorted(norms.tolist())
    assert sorted_norms[4] * 0.97 <= dp.clip_norm <= sorted_norms[5] * 1.03


def test_adaptive_clipping_splits_the_noise_multiplier() -> None:
    d = 200_000
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(4)) * 1e-4
    sigma, c, expected = 1.5, 0.4, 40.0  # count noise 40 / 20 = 2 > sigma / 2
    clean = _combine(DPMean(noise_multiplier=0.0, clip_norm=c, expected_clients=expected,
                            seed=SEED), x)  # fmt: skip
    dp = DPMean(noise_multiplier=sigma, clip_norm=c, expected_clients=expected, seed=SEED,
                target_quantile=0.5)  # fmt: skip
    noise = (_combine(dp, x, round_=2) - clean).double()
    update_sigma = (sigma**-2 - (2 * 2.0) ** -2) ** -0.5
    assert abs(float(noise.std()) / (update_sigma * c / expected) - 1) < 0.01
    with pytest.raises(InvalidArgumentError, match="must exceed noise_multiplier / 2"):
        DPMean(noise_multiplier=1.2, clip_norm=1.0, expected_clients=10.0, seed=SEED,
               target_quantile=0.5)  # fmt: skip


@pytest.mark.timeout(300)
def test_the_cli_adapts_the_bound_logs_it_and_resumes_bitwise(tmp_path: Path) -> None:
    options = [*TINY, "--num-clients", "60", "--dp", "central", "--dp-noise-multiplier", "0.5",
               "--dp-clip-norm", "0.05", "--dp-adaptive-clip-quantile", "0.5",
               "--checkpoint-every", "1"]  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", *options, "--rounds", "4", "--output-dir", str(whole)]) == 0
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    bounds = [r["dp_clip_norm"] for r in rows]
    assert bounds[0] != 0.05 and len(set(bounds)) == 4  # it moves every round
    assert main(["run", *options, "--rounds", "2", "--output-dir", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "4", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp_clip_norm"] for r in resumed] == bounds


@pytest.mark.parametrize(("target", "q", "rounds"), [(5.0, 0.3, 30), (1.0, 0.01, 1000)])
def test_the_noise_for_a_target_epsilon_is_the_smallest_that_meets_it(
    target: float, q: float, rounds: int
) -> None:
    sigma = noise_for_epsilon(target, q, rounds, 1e-5)
    assert epsilon(sigma, q, rounds, 1e-5) <= target
    assert epsilon(sigma - 1e-3, q, rounds, 1e-5) > target  # within 1e-3 of the optimum
    with pytest.raises(ConfigError, match="is unreachable"):
        noise_for_epsilon(1e-6, 1.0, 10_000, 1e-5)


def test_the_cli_spends_the_target_epsilon_and_refuses_more_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    options = [*TINY, "--dp", "central", "--dp-target-epsilon", "8", "--dp-delta", "1e-4"]
    assert main(["run", *options, "--rounds", "3", "--output-dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 7.99 <= rows[-1]["dp_epsilon"] <= 8.0
    assert "dp_target_epsilon = 8" in (run_dir / "config.toml").read_text()
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--rounds", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "calibrated its noise to spend epsilon 8.0 in 3 rounds" in err, err
