"""Uplink compression: each encoding against an independent reference, error feedback,
honest byte counts, and the same bits in every per-client mode.

Top-k against a stable numpy sort; random-k's indices and QSGD's rounding against numpy's
Philox on the client's stream; the scaled sign against its formula; every payload's length
against the format it documents and the round's ``uplink_bytes`` against the payloads;
top-k with k = all is no compression bit for bit; the residual after a round is what the
payload left out; CLI options, errors and resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl.algorithms import Compressed, FedAvg, FedProx
from emberfl.algorithms.compressed import RESIDUAL
from emberfl.cli import main
from emberfl.compression import QSGD, RandomK, ScaledSign, TopK
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.executors import ClientSetup, make_executor
from emberfl.rng import Purpose, stream
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 9


def _x(d: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _philox(cid: int = 3, rnd: int = 2) -> np.random.Generator:
    return np.random.Generator(
        np.random.Philox(key=[SEED, int(Purpose.COMPRESSION)], counter=[0, cid, rnd, 0])
    )


def _stream(cid: int = 3, rnd: int = 2):  # type: ignore[no-untyped-def]
    return stream(SEED, purpose=Purpose.COMPRESSION, client=cid, round=rnd)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_top_k_keeps_the_largest_magnitudes(ratio: float) -> None:
    x = _x()
    x[10] = -x[20]  # a tie in magnitude
    compressor = TopK(ratio)
    payload = compressor.encode(x, _stream())
    k = max(1, math.ceil(ratio * 1000))
    assert len(payload) == 4 + 8 * k
    order = np.argsort(-np.abs(x.numpy()), kind="stable")[:k]  # ties: the lower index
    expected = torch.zeros(1000)
    expected[order] = x[order]
    assert torch.equal(compressor.decode(payload, 1000), expected)


def test_random_k_sends_values_at_the_streams_indices() -> None:
    x = _x()
    compressor = RandomK(0.05)
    payload = compressor.encode(x, _stream())
    assert len(payload) == 4 + 4 * 50  # k, then the values: the server replays the indices
    # The indices are the stream's k distinct draws (emberfl's partial Fisher-Yates,
    # tested in test_rng.py); the values sent are x's at them.
    index = np.sort(_stream().choice(1000, 50))
    assert len(set(index.tolist())) == 50
    expected = torch.zeros(1000)
    expected[index] = x[index]
    decoded = compressor.decode(payload, 1000, _stream())
    assert torch.equal(decoded, expected)
    assert np.array_equal(np.frombuffer(payload, "<f4", offset=4), x.numpy()[index])
    other = compressor.encode(x, _stream(3, 5))  # another round, other indices
    assert not torch.equal(compressor.decode(other, 1000, _stream(3, 5)), decoded)
    with pytest.raises(InvalidArgumentError, match="decodes with the client's stream"):
        compressor.decode(payload, 1000)


@pytest.mark.parametrize("levels", [1, 4, 16, 255])
def test_qsgd_is_stochastic_rounding_of_the_normalised_magnitudes(levels: int) -> None:
    x = _x()
    compressor = QSGD(levels)
    payload = compressor.encode(x, _stream())
    bits = 1 + math.ceil(math.log2(levels + 1))
    assert len(payload) == 4 + math.ceil(1000 * bits / 8)
    x64 = x.double().numpy()
    norm = float(np.float32(np.sqrt((x64**2).sum())))
    u = _philox().random(1000)
    level = np.minimum(np.floor(np.abs(x64) * (levels / np.sqrt((x64**2).sum())) + u), levels)
    expected = (np.sign(x64) * level * (norm / levels)).astype(np.float32)
    assert np.array_equal(compressor.decode(payload, 1000).numpy(), expected)


def test_qsgd_is_unbiased() -> None:
    x = _x(200)
    compressor = QSGD(2)
    total = torch.zeros(200, dtype=torch.float64)
    n = 4000
    for r in range(n):
        total += compressor.decode(compressor.encode(x, _stream(0, r)), 200).double()
    # Each entry's variance is at most (norm / s)^2 / 4: the mean is within 5 sigma.
    bound = 5 * (float(x.norm()) / 2) / 2 / math.sqrt(n)
    assert float((total / n - x.double()).abs().max()) < bound


def test_scaled_sign_is_the_mean_magnitude_times_the_sign() -> None:
    x = _x(999)
    compressor = ScaledSign()
    payload = compressor.encode(x, _stream())
    assert len(payload) == 4 + math.ceil(999 / 8)
    scale = np.float32(np.abs(x.double().numpy()).mean())
    expected = torch.where(x < 0, -torch.tensor(scale), torch.tensor(scale))
    assert torch.equal(compressor.decode(payload, 999), expected)


def test_bad_payloads_and_options_are_clear_errors() -> None:
    payload = TopK(0.1).encode(_x(), _stream())
    with pytest.raises(InvalidArgumentError, match="of 100 entries has 804 bytes, got 803"):
        TopK(0.1).decode(payload[:-1], 1000)
    with pytest.raises(InvalidArgumentError, match="beyond 50"):
        TopK(0.1).decode(payload, 50)
    with pytest.raises(ConfigError, match=r"compression_ratio must be in \(0, 1\]"):
        TopK(0.0)
    with pytest.raises(ConfigError, match="qsgd_levels must be an integer >= 1"):
        QSGD(0)
    with pytest.raises(InvalidArgumentError):
        TopK(0.5).encode(torch.tensor([1.0, float("nan")]), _stream())


# ------------------------------------------------------------------------------------------
# Compressed algorithms
# ------------------------------------------------------------------------------------------

N = 8


def _run(algorithm, mode: str = "serial", p: int = 1, rounds: int = 2):  # type: ignore[no-untyped-def]
    setup = ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)
    with Simulation(
        algorithm, make_executor(mode, setup, parallelism=p), num_clients=N, clients_per_round=5
    ) as sim:
        history = [sim.run_round() for _ in range(rounds)]
        residuals = {}
        if sim.client_state is not None:
            residuals = {
                c: sim.client_state.views(c)[RESIDUAL].clone()
                for c in range(N)
                if RESIDUAL in sim.client_state.views(c)
            }
        return sim.state.model.clone(), history, residuals


def test_top_k_of_every_entry_is_no_compression_bit_for_bit() -> None:
    plain, plain_history, _ = _run(FedProx(lr=0.1, mu=0.1))
    model, history, residuals = _run(Compressed(FedProx(lr=0.1, mu=0.1), TopK(1.0)))
    assert torch.equal(model, plain)
    assert all(float(r.abs().max()) == 0.0 for r in residuals.values())
    dim = plain.numel()
    assert [h["uplink_bytes"] for h in history] == [5 * (4 + 8 * dim)] * 2
    assert [h["uplink_bytes"] for h in plain_history] == [5 * 4 * dim] * 2
    assert plain_history[0]["downlink_bytes"] == 5 * 4 * dim


def test_error_feedback_keeps_what_the_payload_left_out() -> None:
    compressor = TopK(0.1)
    setup = ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)
    with Simulation(FedAvg(lr=0.1), make_executor("serial", setup), num_clients=N) as sim:
        x0 = sim.state.model.clone()
        sim.run_round([4])
        delta = sim.state.model - x0  # client 4's honest round-0 update
    _, history, residuals = _run(Compressed(FedAvg(lr=0.1), compressor), rounds=1)
    sent = compressor.decode(compressor.encode(delta, _stream(4, 0)), delta.numel())
    sampled = [c for c, r in residuals.items() if float(r.abs().max()) > 0]
    assert 4 in sampled
    assert torch.allclose(residuals[4], delta - sent, atol=1e-7)
    k = compressor.k(delta.numel())
    assert history[0]["uplink_bytes"] == 5 * (4 + 8 * k)
    # Without error feedback there is no residual, and the models differ.
    no_ef, _, none_kept = _run(Compressed(FedAvg(lr=0.1), compressor, error_feedback=False))
    with_ef, _, _ = _run(Compressed(FedAvg(lr=0.1), compressor))
    assert none_kept == {} and not torch.equal(no_ef, with_ef)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("compressor", [RandomK(0.2), QSGD(4), ScaledSign()])
def test_compressed_runs_have_the_same_bits_in_every_mode(compressor: object) -> None:
    reference, _, ref_residuals = _run(Compressed(FedAvg(lr=0.1, epochs=2), compressor))  # type: ignore[arg-type]
    for mode, p in [("thread", 2), ("thread", 4), ("process", 2), ("process", 4)]:
        model, _, residuals = _run(Compressed(FedAvg(lr=0.1, epochs=2), compressor), mode, p)  # type: ignore[arg-type]
        assert torch.equal(model, reference), (mode, p)
        assert all(torch.equal(residuals[c], ref_residuals[c]) for c in ref_residuals)


@pytest.mark.parametrize(
    "algorithm",
    [
        Compressed(FedAvg(lr=0.1, epochs=2), TopK(0.3)),
        Compressed(FedProx(lr=0.1, mu=0.2), ScaledSign()),
        Compressed(FedAvg(lr=0.1), QSGD(8), error_feedback=False),
    ],
)
def test_vectorized_mode_compresses_each_client_as_the_serial_mode(algorithm: Compressed) -> None:
    assert algorithm.vectorizable
    reference, history, ref_residuals = _run(algorithm, rounds=3)
    model, vec_history, residuals = _run(algorithm, "vectorized", 2, rounds=3)
    assert float((model - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert [h["uplink_bytes"] for h in vec_history] == [h["uplink_bytes"] for h in history]
    assert set(residuals) == set(ref_residuals)
    for c, r in ref_residuals.items():
        assert torch.allclose(residuals[c], r, atol=1e-6), c


TINY = ["--num-clients", "6", "--epochs", "1", "--batch-size", "16", "--train-size", "300",
        "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compression-ratio", "0.1"], "is an option of compression 'topk' or 'randk'"),
        (["--compression", "qsgd", "--compression-ratio", "0.1"], "not 'qsgd'"),
        (["--qsgd-levels", "4"], "is an option of compression 'qsgd', not 'none'"),
        (["--compression", "topk", "--compression-ratio", "0"], "must be in (0, 1]"),
        (["--compression", "qsgd", "--qsgd-levels", "0"], "qsgd_levels must be an integer"),
        (["--no-error-feedback"], "needs a compression"),
        (
            ["--compression", "topk", "--mode", "vectorized", "--algorithm", "qffl"],
            "cannot run in vectorized mode",
        ),
        (["--compression", "topk", "--algorithm", "ditto"], "keeps per-client models"),
    ],
)
def test_bad_compression_options_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", *argv, "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "argv",
    [
        ["--compression", "topk", "--compression-ratio", "0.05"],
        ["--compression", "randk", "--compression-ratio", "0.2", "--algorithm", "scaffold"],
        ["--compression", "qsgd", "--qsgd-levels", "8", "--algorithm", "fedadam"],
        ["--compression", "sign", "--no-error-feedback"],
    ],
)
def test_compressed_cli_runs_log_bytes_and_resume_bitwise(tmp_path: Path, argv: list[str]) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    options = [*TINY, *argv, "--checkpoint-every", "1"]
    assert main(["run", *options, "--rounds", "3", "--output-dir", str(whole)]) == 0
    assert main(["run", *options, "--rounds", "2", "--output-dir", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "3", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["uplink_bytes"] < r["downlink_bytes"] for r in rows)


def test_every_compression_option_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--compression ", "--compression-ratio", "--qsgd-levels", "--no-error-feedback"):
        assert flag in text, flag
