"""Numeric faults and loose arguments: every one is an emberfl error that says what is wrong.

* A non-finite client update names the client, the uplink stream, the layer, the first
  offending index inside that layer and the value; the expected text is recomputed here
  with plain torch from the model's ``state_dict``.
* :func:`~emberfl.aggregation.norms` and :func:`~emberfl.aggregation.pairwise_sq_dists`
  agree with ``torch.linalg.vector_norm`` / explicit float64 sums on finite inputs and
  raise :class:`~emberfl.errors.NonFiniteError` on any non-finite one, so clipping,
  Krum-style selection, the median and the trimmed mean cannot act on a NaN.
* Counts, slot indices, thread counts, RNG words and weights across the Python API reject
  ``1.5``, ``"3"``, ``True``, ``-1`` and ``2**70`` with an emberfl error naming the
  argument and the value, and accept NumPy / PyTorch integer scalars.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl import aggregation as agg
from emberfl import rng
from emberfl._checks import check_int, check_real, check_slot
from emberfl.aggregation import Mean, Median, TrimmedMean, UpdateSet, WeightedSum
from emberfl.aggregation import streaming as streaming_module
from emberfl.algorithms import Client, ClientResult, FedAvg, ModelLayout
from emberfl.arena import ParamArena
from emberfl.errors import (
    ConfigError,
    EmberflError,
    InvalidArgumentError,
    InvalidWeightsError,
    NonFiniteError,
    SlotIndexError,
    TensorMismatchError,
)
from emberfl.executors import ClientSetup, make_executor
from emberfl.reproducibility import (
    client_rng_suite,
    create_rng_suite,
    seed_everything,
    setup_reproducibility,
)
from emberfl.simulation import Simulation
from emberfl.state_store import ClientStateStore, StateLocation, attach_state
from fl_testkit import LazyData, conv_model

NAN, INF = float("nan"), float("inf")
BAD_VALUES: list[Any] = [1.5, "3", True, -1, 2**70]

# Layers of a small model, as (name, shape): the reference layout of these tests.
LAYERS: list[tuple[str, tuple[int, ...]]] = [
    ("conv1.weight", (6, 1, 5, 5)),
    ("conv1.bias", (6,)),
    ("fc.weight", (10, 24)),
    ("fc.bias", (10,)),
]


class Net(torch.nn.Module):
    """A model whose ``state_dict`` is :data:`LAYERS`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 5)
        self.fc = torch.nn.Linear(24, 10)


class WB(torch.nn.Module):
    """A model of two buffers, ``w`` (4) and ``b`` (2)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(4))
        self.register_buffer("b", torch.zeros(2))


def test_the_reference_layers_are_the_models() -> None:
    assert [(k, tuple(v.shape)) for k, v in Net().state_dict().items()] == LAYERS


def expected_location(
    x: torch.Tensor, layers: list[tuple[str, tuple[int, ...]]]
) -> tuple[str, int, float]:
    """The first non-finite element of flat ``x``: (layer, index in it, value), with torch."""
    bad = torch.nonzero(~torch.isfinite(x.reshape(-1)))
    assert bad.numel() > 0
    flat = int(bad[0, 0])
    start = 0
    for name, shape in layers:
        numel = math.prod(shape)
        if flat < start + numel:
            return name, flat - start, float(x.reshape(-1)[flat])
        start += numel
    raise AssertionError("index outside the layers")


def value_text(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def poisoned(dim: int, positions: list[int], values: list[float], *, seed: int = 0) -> torch.Tensor:
    x = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    for p, v in zip(positions, values, strict=True):
        x[p] = v
    return x


DIM = sum(math.prod(s) for _, s in LAYERS)
non_finite = st.sampled_from([NAN, INF, -INF])


# ---------------------------------------------------------------------------------------
# 1. Non-finite client updates name the client, stream, layer, index and value
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    positions=st.lists(st.integers(0, DIM - 1), min_size=1, max_size=4, unique=True),
    data=st.data(),
    cid=st.integers(0, 10_000),
)
def test_weighted_sum_names_the_first_bad_layer_and_index(
    positions: list[int], data: st.DataObject, cid: int
) -> None:
    values = [data.draw(non_finite) for _ in positions]
    x = poisoned(DIM, positions, values)
    layout = ModelLayout.of(Net())
    s = WeightedSum(DIM, name="delta", layout=layout.items)
    s.add(torch.ones(DIM), 2.0, source="client 0")
    before = s.sum64().clone()
    name, index, value = expected_location(x, LAYERS)
    expected = (
        f"client {cid} sent a non-finite update: stream 'delta', layer '{name}' "
        f"[index {index}] is {value_text(value)}"
    )
    with pytest.raises(NonFiniteError) as info:
        s.add(x, 1.0, source=f"client {cid}")
    assert str(info.value).startswith(expected)
    assert "lower the learning rate, or clip updates" in str(info.value)
    assert s.count == 1 and s.weight == 2.0 and torch.equal(s.sum64(), before)


def test_weighted_sum_without_a_layout_names_the_flat_index() -> None:
    s = WeightedSum(50, name="c_delta")
    x = torch.zeros(50)
    x[37] = -INF
    with pytest.raises(NonFiniteError, match=r"^client 4 sent a non-finite update: stream "):
        s.add(x, 1.0, source="client 4")
    with pytest.raises(NonFiniteError, match=r"stream 'c_delta', index 37 is -inf"):
        s.add(x, 1.0, source="client 4")
    assert s.count == 0


def test_the_message_is_worked_out_only_on_the_failing_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the failing path ran for a finite update")

    monkeypatch.setattr(streaming_module, "non_finite_update", boom)
    s = WeightedSum(1000, name="delta")
    for k in range(5):
        s.add(torch.full((1000,), float(k)), 1.0, source=f"client {k}")
    assert s.count == 5
    with pytest.raises(AssertionError, match="failing path ran"):
        s.add(torch.full((1000,), NAN), 1.0, source="client 9")


def test_update_set_names_the_layer_and_checks_after_the_float32_cast() -> None:
    layout = ModelLayout.of(Net())
    with UpdateSet(3, DIM, name="delta", layout=layout.items) as updates:
        updates.add(torch.ones(DIM), 1.0, source="client 0")
        x = poisoned(DIM, [200, 5], [NAN, INF])
        name, index, _ = expected_location(x, LAYERS)
        assert (name, index) == ("conv1.weight", 5)
        with pytest.raises(
            NonFiniteError,
            match=rf"^client 3 sent a non-finite update: stream 'delta', layer "
            rf"'{re.escape(name)}' \[index {index}\] is inf",
        ):
            updates.add(x, 1.0, source="client 3")
        # Finite in float64, infinite once stored as float32.
        big = torch.zeros(DIM, dtype=torch.float64)
        big[160] = 1e39
        assert bool(torch.isfinite(big).all())
        with pytest.raises(NonFiniteError, match=r"layer 'fc.weight' \[index 4\] is inf"):
            updates.add(big, 1.0, source="client 5")
        assert updates.count == 1 and updates.weights == [1.0]
        # Finite values near float32's limit are no false alarm (their sum overflows).
        updates.add(torch.full((DIM,), 3e38), 1.0, source="client 6")
        assert updates.count == 2


class PoisonOne(FedAvg):
    """FedAvg whose client ``bad_cid`` writes ``value`` at flat index ``index`` of its delta."""

    def __init__(self, *, lr: float, bad_cid: int, index: int, value: float) -> None:
        super().__init__(lr=lr)
        self.bad_cid, self.index, self.value = bad_cid, index, value

    def client_update(self, client: Client) -> ClientResult:
        result = super().client_update(client)
        if client.cid == self.bad_cid:
            result.uplink["delta"][self.index] = self.value
        return result


def _model_layers(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("aggregator", [None, Median()], ids=["mean", "median"])
@pytest.mark.parametrize(("mode", "parallelism"), [("serial", 1), ("thread", 2)])
@pytest.mark.parametrize(("bad_cid", "index", "value"), [(5, 30, NAN), (2, 100, -INF)])
def test_a_simulation_names_the_client_stream_layer_and_index(
    aggregator: Median | None,
    mode: str,
    parallelism: int,
    bad_cid: int,
    index: int,
    value: float,
) -> None:
    model = conv_model()
    layers = _model_layers(model)
    delta = torch.zeros(sum(math.prod(s) for _, s in layers))
    delta[index] = value
    name, within, _ = expected_location(delta, layers)
    setup = ClientSetup(LazyData(8, image=True), model, batch_size=3, seed=3)
    algorithm = PoisonOne(lr=0.1, bad_cid=bad_cid, index=index, value=value)
    executor = make_executor(mode, setup, parallelism=parallelism)
    with Simulation(algorithm, executor, num_clients=8, aggregator=aggregator) as sim:
        x0 = sim.state.model.clone()
        with pytest.raises(NonFiniteError) as info:
            sim.run_round()
        assert str(info.value).startswith(
            f"client {bad_cid} sent a non-finite update: stream 'delta', layer '{name}' "
            f"[index {within}] is {value_text(value)}"
        )
        assert torch.equal(sim.state.model, x0) and sim.round == 0


def test_the_cli_names_the_diverging_client_and_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emberfl.cli import main

    args = ["run", "--lr", "1e30", "--rounds", "1", "--epochs", "1", "--num-clients", "3"]
    args += ["--train-size", "300", "-q", "--output-dir", str(tmp_path / "run")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) != 0
    err = capsys.readouterr().err
    assert re.search(
        r"client \d+ sent a non-finite update: stream 'delta', layer '[\w.]+' \[index \d+\] "
        r"is (nan|inf|-inf); it was not aggregated \(.*lower the learning rate, or clip",
        err,
    ), err


# ---------------------------------------------------------------------------------------
# 2. norms and pairwise distances: exact on finite inputs, raising on non-finite ones
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def filled(rows: torch.Tensor) -> Iterator[ParamArena]:
    half = rows.shape[1] // 2
    model = {"a": torch.zeros(half), "b": torch.zeros(rows.shape[1] - half)}
    with ParamArena.from_model(model, rows.shape[0]) as arena:
        arena.tensor.copy_(rows)
        yield arena


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 6),
    dim=st.integers(2, 3000),
    scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]),
    seed=st.integers(0, 2**31),
)
def test_norms_and_distances_match_torch_on_finite_inputs(
    k: int, dim: int, scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.rand(k, dim, generator=g, dtype=torch.float64) * 2 - 1) * scale
    rows = rows.to(torch.float32)
    assert bool(torch.isfinite(rows).all())
    order = torch.randperm(k, generator=g).tolist()
    with filled(rows) as arena:
        got = agg.norms(arena, order)
        ref = torch.linalg.vector_norm(rows[order].double(), dim=1)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)
        d = agg.pairwise_sq_dists(arena, order)
        x = rows[order].double()
        ref_d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        torch.testing.assert_close(d, ref_d, rtol=1e-10, atol=0.0)
        assert torch.equal(d.diagonal(), torch.zeros(k, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    dim=st.integers(2, 2000),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_norms_and_distances_raise_on_any_non_finite_input(
    k: int, dim: int, data: st.DataObject, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, dim, generator=g)
    bad_rows = data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    for r in bad_rows:
        cols = data.draw(st.lists(st.integers(0, dim - 1), min_size=1, max_size=3, unique=True))
        for c in cols:
            rows[r, c] = data.draw(non_finite)
    order = data.draw(st.permutations(range(k)))
    first = next(s for s in order if not bool(torch.isfinite(rows[s]).all()))
    name, index, value = expected_location(
        rows[first], [("a", (dim // 2,)), ("b", (dim - dim // 2,))]
    )
    tail = rf"tensor '{name}' \[index {index}\] is {value_text(value)}"
    with filled(rows) as arena:
        with pytest.raises(NonFiniteError, match=rf"^slot {first} holds .*{tail}"):
            agg.norms(arena, order)
        row = order.index(first)
        with pytest.raises(
            NonFiniteError, match=rf"^slot {first} \(row {row} of the distance matrix\).*{tail}"
        ):
            agg.pairwise_sq_dists(arena, order)


def test_same_signed_infinities_in_every_slot_still_raise() -> None:
    # inf - inf is NaN: every distance is NaN, none is infinite.
    rows = torch.zeros(3, 8)
    rows[:, 2] = INF
    with (
        filled(rows) as arena,
        pytest.raises(NonFiniteError, match=r"slot 0 \(row 0 .*'a' \[index 2\] is inf"),
    ):
        agg.pairwise_sq_dists(arena, [0, 1, 2])


def test_a_single_slot_has_no_distance_but_is_still_checked() -> None:
    rows = torch.zeros(1, 8)
    with filled(rows) as single:
        assert agg.pairwise_sq_dists(single, [0]).tolist() == [[0.0]]
        single.slot(0)[7] = NAN
        with pytest.raises(NonFiniteError, match=r"'b' \[index 3\] is nan"):
            agg.pairwise_sq_dists(single, [0])


def krum_select(arena: ParamArena, slots: list[int], f: int) -> int:
    """Krum (Blanchard 2017) on the kernels: the slot with the smallest sum of distances to
    its ``len(slots) - f - 2`` nearest neighbours."""
    d = agg.pairwise_sq_dists(arena, slots)
    m = len(slots) - f - 2
    scores = torch.sort(d, dim=1).values[:, 1 : m + 1].sum(1)
    return slots[int(torch.argmin(scores))]


def clip_factors(arena: ParamArena, slots: list[int], bound: float) -> torch.Tensor:
    """Norm clipping on the kernels: the factor each update is scaled by."""
    return torch.clamp(bound / agg.norms(arena, slots), max=1.0)


def test_rules_built_on_the_kernels_raise_instead_of_mis_selecting() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 40, generator=g) * 0.01
    rows[6] = 5.0  # an outlier Krum must not pick
    with filled(rows) as arena:
        assert krum_select(arena, list(range(7)), f=1) != 6
        assert bool((clip_factors(arena, list(range(7)), 1.0) <= 1.0).all())
        arena.slot(3)[25] = NAN
        # Without the check, row 3 of the matrix is NaN and torch.sort puts NaN last, so
        # the NaN client's score is NaN and argmin would return it.
        with pytest.raises(NonFiniteError, match=r"slot 3 \(row 3 .*'b' \[index 5\] is nan"):
            krum_select(arena, list(range(7)), f=1)
        with pytest.raises(NonFiniteError, match=r"slot 3 holds .*'b' \[index 5\] is nan"):
            clip_factors(arena, list(range(7)), 1.0)
        with pytest.raises(NonFiniteError, match="slot 3"):
            agg.median(arena, list(range(7)), torch.empty(40))
        with pytest.raises(NonFiniteError, match="slot 3"):
            agg.trimmed_mean(arena, list(range(7)), torch.empty(40), 0.2)


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.2), Mean()], ids=lambda r: r.name)
def test_aggregators_raise_on_a_non_finite_stored_update(rule: Median | TrimmedMean | Mean) -> None:
    with UpdateSet(4, 30) as updates:
        for k in range(4):
            updates.add(torch.full((30,), float(k)), 1.0, source=f"client {k}")
        out = torch.full((30,), 7.0)
        rule.combine(updates, out, num_threads=1)
        assert bool(torch.isfinite(out).all())
        updates.arena.slot(2)[11] = -INF  # bypassing add's check
        out.fill_(7.0)
        with pytest.raises(NonFiniteError, match=r"slot 2 .*\[index 11\] is -inf"):
            rule.combine(updates, out, num_threads=1)
        assert torch.equal(out, torch.full((30,), 7.0))


# ---------------------------------------------------------------------------------------
# 3. Loose arguments: emberfl errors naming the argument and the value
# ---------------------------------------------------------------------------------------

Expect = dict[Any, type[Exception] | None]
COUNT: Expect = dict.fromkeys(BAD_VALUES, InvalidArgumentError)
"""A count or a bounded integer: every bad value is an InvalidArgumentError."""
SLOT: Expect = {**COUNT, -1: SlotIndexError, 2**70: SlotIndexError}
"""A slot index: out-of-range values are SlotIndexError."""
CONFIG: Expect = dict.fromkeys(BAD_VALUES, ConfigError)
"""A client state store's argument: ConfigError, as its other configuration errors."""
WEIGHT: Expect = {1.5: None, "3": InvalidWeightsError, True: InvalidWeightsError}
WEIGHT.update({-1: InvalidWeightsError, 2**70: None})
"""A weight: a number >= 0, so 1.5 and 2**70 are valid."""
U64_WORD: Expect = COUNT
SIGNED: Expect = {**COUNT, -1: None}
"""A signed 64-bit bound: -1 is valid."""


def _arena() -> ParamArena:
    return ParamArena.from_model({"w": torch.zeros(4), "b": torch.zeros(2)}, 3)


def _store_location(slot: Any) -> dict[str, torch.Tensor]:
    with ClientStateStore({"c": 2}) as store:
        loc = store.location(0)
        return attach_state(StateLocation(loc.handle, slot))


def _update_set_weight(w: Any) -> None:
    with UpdateSet(1, 3) as updates:
        updates.add(torch.zeros(3), w, source="client 1")


def _combine_threads(t: Any) -> None:
    with UpdateSet(1, 3) as updates:
        updates.add(torch.zeros(3), 1.0, source="client 1")
        Median().combine(updates, torch.empty(3), num_threads=t)


def _with_arena(call: Callable[[ParamArena, Any], object]) -> Callable[[Any], object]:
    def run(bad: Any) -> object:
        with _arena() as arena:
            return call(arena, bad)

    return run


def _with_store(call: Callable[[ClientStateStore, Any], object]) -> Callable[[Any], object]:
    def run(bad: Any) -> object:
        with ClientStateStore({"c": 2}) as store:
            return call(store, bad)

    return run


A = _with_arena
# (id, call taking the bad value, the argument's name in the message, expectations)
CASES: list[tuple[str, Callable[[Any], object], str, Expect]] = [
    # ParamArena
    (
        "from_model.num_slots",
        lambda v: ParamArena.from_model({"w": torch.zeros(2)}, v),
        "num_slots",
        COUNT,
    ),
    (
        "from_layout.num_slots",
        A(lambda a, v: ParamArena.from_layout(a.layout, v)),
        "num_slots",
        COUNT,
    ),
    ("slot", A(lambda a, v: a.slot(v)), "slot index", SLOT),
    ("state_dict", A(lambda a, v: a.state_dict(v)), "slot index", SLOT),
    (
        "store",
        A(lambda a, v: a.store(v, {"w": torch.zeros(4), "b": torch.zeros(2)})),
        "slot index",
        SLOT,
    ),
    (
        "load",
        A(lambda a, v: a.load(v, WB())),
        "slot index",
        SLOT,
    ),
    ("copy_slot.src", A(lambda a, v: a.copy_slot(v, 0)), "src", SLOT),
    ("copy_slot.dst", A(lambda a, v: a.copy_slot(0, v)), "dst", SLOT),
    (
        "name_of",
        A(lambda a, v: a.name_of(v)),
        "index",
        {**COUNT, -1: IndexError, 2**70: IndexError},
    ),
    # kernels
    (
        "weighted_mean.slots",
        A(lambda a, v: agg.weighted_mean(a, [0, v], [1, 1], 2)),
        "slots[1]",
        SLOT,
    ),
    (
        "weighted_mean.weights",
        A(lambda a, v: agg.weighted_mean(a, [0, 1], [1, v], 2)),
        "weight",
        WEIGHT,
    ),
    ("weighted_mean.out", A(lambda a, v: agg.weighted_mean(a, [0, 1], [1, 1], v)), "out", SLOT),
    (
        "weighted_mean.num_threads",
        A(lambda a, v: agg.weighted_mean(a, [0], [1], 2, num_threads=v)),
        "num_threads",
        COUNT,
    ),
    ("median.slots", A(lambda a, v: agg.median(a, [v, 1], 2)), "slots[0]", SLOT),
    ("median.out", A(lambda a, v: agg.median(a, [0, 1], v)), "out", SLOT),
    (
        "median.num_threads",
        A(lambda a, v: agg.median(a, [0, 1], 2, num_threads=v)),
        "num_threads",
        COUNT,
    ),
    ("trimmed_mean.slots", A(lambda a, v: agg.trimmed_mean(a, [0, v], 2, 0.0)), "slots[1]", SLOT),
    ("trimmed_mean.out", A(lambda a, v: agg.trimmed_mean(a, [0, 1], v, 0.0)), "out", SLOT),
    ("trimmed_mean.beta", A(lambda a, v: agg.trimmed_mean(a, [0, 1], 2, v)), "beta", COUNT),
    (
        "trimmed_mean.num_threads",
        A(lambda a, v: agg.trimmed_mean(a, [0, 1], 2, 0.0, num_threads=v)),
        "num_threads",
        COUNT,
    ),
    ("norms.slots", A(lambda a, v: agg.norms(a, [v])), "slots[0]", SLOT),
    ("norms.num_threads", A(lambda a, v: agg.norms(a, [0], num_threads=v)), "num_threads", COUNT),
    ("pairwise.slots", A(lambda a, v: agg.pairwise_sq_dists(a, [0, 1, v])), "slots[2]", SLOT),
    (
        "pairwise.num_threads",
        A(lambda a, v: agg.pairwise_sq_dists(a, [0, 1], num_threads=v)),
        "num_threads",
        COUNT,
    ),
    # streaming sums, update sets, aggregators
    ("WeightedSum.dim", lambda v: WeightedSum(v), "dim", COUNT),
    ("WeightedSum.num_threads", lambda v: WeightedSum(3, num_threads=v), "num_threads", COUNT),
    (
        "WeightedSum.add.weight",
        lambda v: WeightedSum(3).add(torch.zeros(3), v, source="client 1"),
        "weight",
        WEIGHT,
    ),
    ("UpdateSet.count", lambda v: UpdateSet(v, 3).close(), "count", COUNT),
    ("UpdateSet.dim", lambda v: UpdateSet(2, v).close(), "dim", COUNT),
    (
        "UpdateSet.add.weight",
        _update_set_weight,
        "weight",
        {**WEIGHT, -1: InvalidArgumentError, "3": InvalidArgumentError, True: InvalidArgumentError},
    ),
    ("TrimmedMean.beta", lambda v: TrimmedMean(v), "beta", COUNT),
    ("Aggregator.combine.num_threads", _combine_threads, "num_threads", COUNT),
    # client state store
    (
        "ClientStateStore.spec",
        lambda v: ClientStateStore({"c": v}),
        "client state entry 'c'",
        CONFIG,
    ),
    (
        "ClientStateStore.segment_slots",
        lambda v: ClientStateStore({"c": 1}, segment_slots=v),
        "segment_slots",
        CONFIG,
    ),
    ("ClientStateStore.views", _with_store(lambda s, v: s.views(v)), "client id", CONFIG),
    ("ClientStateStore.location", _with_store(lambda s, v: s.location(v)), "client id", CONFIG),
    (
        "ClientStateStore.mark_written",
        _with_store(lambda s, v: s.mark_written(v)),
        "client id",
        CONFIG,
    ),
    (
        "attach_state.slot",
        _store_location,
        "slot",
        {**COUNT, -1: TensorMismatchError, 2**70: TensorMismatchError},
    ),
    # random streams
    ("stream.seed", lambda v: rng.stream(v), "seed", U64_WORD),
    ("stream.purpose", lambda v: rng.stream(0, purpose=v), "purpose", U64_WORD),
    ("stream.client", lambda v: rng.stream(0, client=v), "client", U64_WORD),
    ("stream.round", lambda v: rng.stream(0, round=v), "round", U64_WORD),
    ("Stream.seed", lambda v: rng.Stream(v), "seed", U64_WORD),
    ("numpy_generator.seed", lambda v: rng.numpy_generator(v), "seed", U64_WORD),
    ("numpy_generator.client", lambda v: rng.numpy_generator(0, client=v), "client", U64_WORD),
    ("numpy_generator.round", lambda v: rng.numpy_generator(0, round=v), "round", U64_WORD),
    ("Stream.random_raw", lambda v: rng.stream(0).random_raw(v), "n", COUNT),
    ("Stream.random", lambda v: rng.stream(0).random(v), "n", COUNT),
    ("Stream.normal", lambda v: rng.stream(0).normal(v), "n", COUNT),
    ("Stream.permutation", lambda v: rng.stream(0).permutation(v), "n", COUNT),
    ("Stream.integers.n", lambda v: rng.stream(0).integers(0, 5, v), "n", COUNT),
    ("Stream.integers.low", lambda v: rng.stream(0).integers(v, 5, 2), "low", SIGNED),
    ("Stream.integers.high", lambda v: rng.stream(0).integers(-5, v, 2), "high", SIGNED),
    ("Stream.choice.n", lambda v: rng.stream(0).choice(v, 0), "n", COUNT),
    ("Stream.choice.k", lambda v: rng.stream(0).choice(5, v), "k", COUNT),
    (
        "Stream.from_state",
        lambda v: rng.Stream.from_state((0, 0, 0, v, 0, 0, 4, False, 0)),
        "state[3]",
        COUNT,
    ),
    (
        "philox4x64_10.counter",
        lambda v: rng.philox4x64_10([0, 0, v, 0], [0, 0]),
        "counter[2]",
        U64_WORD,
    ),
    ("philox4x64_10.key", lambda v: rng.philox4x64_10([0, 0, 0, 0], [v, 0]), "key[0]", U64_WORD),
    (
        "philox4x32_10.counter",
        lambda v: rng.philox4x32_10([v, 0, 0, 0], [0, 0]),
        "counter[0]",
        U64_WORD,
    ),
    ("philox4x32_10.key", lambda v: rng.philox4x32_10([0, 0, 0, 0], [0, v]), "key[1]", U64_WORD),
    # reproducibility
    ("client_rng_suite.seed", lambda v: client_rng_suite(v, 0, 0), "seed", U64_WORD),
    ("client_rng_suite.cid", lambda v: client_rng_suite(0, v, 0), "cid", U64_WORD),
    ("client_rng_suite.round", lambda v: client_rng_suite(0, 0, v), "round", U64_WORD),
    (
        "client_rng_suite.purpose",
        lambda v: client_rng_suite(0, 0, 0, purpose=v),
        "purpose",
        U64_WORD,
    ),
    ("create_rng_suite.seed", lambda v: create_rng_suite(v), "seed", U64_WORD),
    ("seed_everything.seed", lambda v: seed_everything(v), "seed", U64_WORD),
    ("setup_reproducibility.seed", lambda v: setup_reproducibility(v), "seed", U64_WORD),
]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
@pytest.mark.parametrize(
    ("call", "name", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_loose_arguments_raise_emberfl_errors(
    call: Callable[[Any], object], name: str, expect: dict[Any, type[Exception] | None], bad: Any
) -> None:
    error = expect[bad]
    if error is None:
        call(bad)  # a valid value for this argument
        return
    with pytest.raises(error) as info:
        call(bad)
    text = str(info.value)
    if error is IndexError:  # a flat parameter index outside a slot: a lookup's IndexError
        assert f"parameter index {bad} is outside a slot" in text, text
        return
    assert isinstance(info.value, EmberflError), type(info.value)
    if error is SlotIndexError:
        assert f"slot {bad} is out of range" in text, text
        if name != "slot index":
            assert text.startswith(f"{name}: "), text
        return
    assert name in text, text
    if error not in (TensorMismatchError, InvalidWeightsError):
        shown = repr(bad) if isinstance(bad, str | bool | float) else str(bad)
        assert text.endswith(f"got {shown}"), text


def test_a_message_names_the_argument_and_the_value() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"^num_slots must be a positive integer, got 1\.5$"
    ):
        ParamArena.from_model({"w": torch.zeros(2)}, 1.5)  # type: ignore[arg-type]
    assert issubclass(InvalidArgumentError, ValueError)


@pytest.mark.parametrize(
    "make",
    [lambda n: np.int64(n), lambda n: np.uint8(n), lambda n: torch.tensor(n)],
    ids=["np.int64", "np.uint8", "torch"],
)
def test_numpy_and_torch_integers_are_accepted(make: Callable[[int], Any]) -> None:
    with ParamArena.from_model({"w": torch.zeros(3)}, make(3)) as arena:
        assert arena.num_slots == 3
        arena.slot(make(1)).fill_(2.0)
        arena.copy_slot(make(1), make(2))
        assert arena.slot(2).tolist() == [2.0, 2.0, 2.0]
        agg.weighted_mean(arena, [make(1), make(2)], [1.0, 1.0], make(0), num_threads=make(2))
        assert arena.slot(0).tolist() == [2.0, 2.0, 2.0]
        assert agg.norms(arena, np.array([1, 2])).tolist() == [math.sqrt(12)] * 2
    ref = rng.stream(5, client=7).random_raw(4)
    assert np.array_equal(rng.stream(make(5), client=make(7)).random_raw(make(4)), ref)


@pytest.mark.parametrize("flag", [np.True_, torch.tensor(True)], ids=["np.bool_", "torch.bool"])
def test_numpy_and_torch_booleans_are_rejected(flag: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="num_slots must be a positive integer"):
        ParamArena.from_model({"w": torch.zeros(3)}, flag)
    with pytest.raises(InvalidArgumentError, match="seed"):
        rng.stream(flag)


def test_valid_calls_still_give_the_reference_results() -> None:
    # numpy's Philox increments the counter before its first block.
    ref = np.random.Philox(key=[3, 4], counter=[5, 6, 7, 8]).random_raw(4).tolist()
    assert rng.philox4x64_10([6, 6, 7, 8], [3, 4]) == ref
    assert rng.philox4x64_10(np.array([6, 6, 7, 8], dtype=np.uint64), (3, 4)) == ref
    s = rng.stream(3, purpose=4, client=9)
    ref_raw = np.random.Philox(key=[3, 4], counter=[0, 9, 0, 0]).random_raw(6)
    assert np.array_equal(s.random_raw(6), ref_raw)
    assert sorted(rng.stream(1).choice(10, 10).tolist()) == list(range(10))
    assert sorted(rng.stream(1).permutation(7).tolist()) == list(range(7))
    draws = rng.stream(2).integers(-(2**63), 2**63 - 1, 1000)
    assert draws.dtype == np.int64 and len(set(draws.tolist())) == 1000
    with pytest.raises(InvalidArgumentError, match="low=5 must be smaller than high=5"):
        rng.stream(0).integers(5, 5, 1)
    with pytest.raises(InvalidArgumentError, match="k=11 distinct values out of n=10"):
        rng.stream(0).choice(10, 11)
    with pytest.raises(InvalidArgumentError, match="counter must be 4 integers, got 3"):
        rng.philox4x64_10([0, 0, 0], [0, 0])
    with pytest.raises(
        InvalidArgumentError, match=r"counter\[1\] must be an integer in 0\.\.2\*\*32-1"
    ):
        rng.philox4x32_10([0, 2**32, 0, 0], [0, 0])


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())
)
def test_check_int_accepts_exactly_the_integers_in_range(value: Any) -> None:
    valid = type(value) is int and 0 <= value <= 100
    if valid:
        assert check_int(value, "x", high=100) == value
    else:
        with pytest.raises(InvalidArgumentError, match=r"^x must be an integer in 0\.\.100, got "):
            check_int(value, "x", high=100)
    if type(value) is int:
        if 0 <= value < 7:
            assert check_slot(value, 7) == value
        else:
            with pytest.raises(SlotIndexError, match=rf"^slot {value} is out of range"):
                check_slot(value, 7)


@given(value=st.one_of(st.floats(), st.integers(-(2**80), 2**80)))
def test_check_real_accepts_numbers_and_rejects_non_finite_when_asked(value: float) -> None:
    assert check_real(value, "w") == float(value) or math.isnan(value)
    if math.isfinite(float(value)):
        assert check_real(value, "w", finite=True) == float(value)
    else:
        with pytest.raises(InvalidArgumentError, match="w must be a finite number"):
            check_real(value, "w", finite=True)
