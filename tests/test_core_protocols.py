"""emberfl.core's protocols and helpers, and their BlazeFL 3.0 compatibility."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import emberfl.core as core
from emberfl.core import (
    BaseClientTrainer,
    BaseServerHandler,
    FilteredDataset,
    ModelSelector,
    PartitionedDataset,
    ProcessPoolClientTrainer,
    SHMHandle,
    ThreadPoolClientTrainer,
    deserialize_model,
    intra_op_threads,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
    serialize_model,
)
from emberfl.core._transport import adopt_tensors, pack, unpack, write_tensors
from emberfl.errors import TensorMismatchError

BLAZEFL_CORE_NAMES = {
    "BaseClientTrainer",
    "BaseServerHandler",
    "FilteredDataset",
    "ModelSelector",
    "PartitionedDataset",
    "ProcessPoolClientTrainer",
    "SHMHandle",
    "ThreadPoolClientTrainer",
    "deserialize_model",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "serialize_model",
}


def test_core_exports_blazefl_names() -> None:
    assert set(core.__all__) >= BLAZEFL_CORE_NAMES
    from emberfl.core.utils import SHMHandle as Handle
    from emberfl.core.utils import serialize_model as ser

    assert Handle is SHMHandle and ser is serialize_model


def test_blazefl_signatures() -> None:
    params = inspect.signature(ProcessPoolClientTrainer.worker).parameters
    assert list(params) == ["config", "payload", "device", "stop_event", "shm_buffer"]
    assert params["shm_buffer"].kind is inspect.Parameter.KEYWORD_ONLY
    assert isinstance(inspect.getattr_static(ProcessPoolClientTrainer, "worker"), staticmethod)
    assert list(inspect.signature(ThreadPoolClientTrainer.worker).parameters) == [
        "self",
        "cid",
        "device",
        "payload",
        "stop_event",
    ]
    for name in ("get_client_config", "prepare_uplink_package_buffer", "shutdown"):
        assert callable(getattr(ProcessPoolClientTrainer, name))
    loader = inspect.signature(PartitionedDataset.get_dataloader).parameters
    assert list(loader) == ["self", "type_", "cid", "batch_size", "generator"]
    assert loader["batch_size"].default is None and loader["generator"].default is None


class Counter(BaseServerHandler[int, str]):
    def __init__(self, *, legacy: bool) -> None:
        self.buffer: list[int] = []
        self.rounds = 0
        self.legacy = legacy

    def downlink_package(self) -> str:
        return f"round {self.rounds}"

    def sample_clients(self) -> list[int]:
        return [0, 1]

    def global_update(self, buffer: list[int]) -> None:
        self.rounds += 1

    def load(self, payload: int) -> bool:
        self.buffer.append(payload)
        if len(self.buffer) == 2:
            self.global_update(self.buffer)
            self.buffer = []
            return True
        return False


class ModernCounter(Counter):
    def is_stopped(self) -> bool:
        return self.rounds >= 2


class LegacyCounter(Counter):
    def if_stop(self) -> bool:  # BlazeFL 2.x name
        return self.rounds >= 2


class Echo(BaseClientTrainer[int, str]):
    def __init__(self) -> None:
        self.cache: list[int] = []

    def local_process(self, payload: str, cid_list: list[int]) -> None:
        self.cache.extend(c * 10 for c in cid_list)

    def uplink_package(self) -> list[int]:
        out, self.cache = self.cache, []
        return out


@pytest.mark.parametrize("handler_cls", [ModernCounter, LegacyCounter])
def test_server_loop_with_is_stopped_or_if_stop(handler_cls: type[Counter]) -> None:
    handler = handler_cls(legacy=handler_cls is LegacyCounter)
    trainer = Echo()
    while not handler.is_stopped():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)
    assert handler.rounds == 2
    assert handler.if_stop() and handler.is_stopped()


def test_missing_is_stopped_is_reported() -> None:
    with pytest.raises(NotImplementedError, match="is_stopped"):
        Counter(legacy=False).is_stopped()


class Name(StrEnum):
    LINEAR = "linear"


class Selector(ModelSelector[Name]):
    def select_model(self, model_name: Name) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_serialize_roundtrip_includes_buffers() -> None:
    a, b = Selector().select_model(Name.LINEAR), Selector().select_model(Name.LINEAR)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.5)
    a.train()(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))  # moves stats
    flat = serialize_model(a)
    assert flat.dim() == 1 and flat.numel() == sum(t.numel() for t in a.state_dict().values())
    deserialize_model(b, flat)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x.float(), y.float()), name
    with pytest.raises(TensorMismatchError, match="has 17 in its state dict"):
        deserialize_model(b, torch.zeros(3))


@dataclass
class Package:
    cid: int
    weights: torch.Tensor | SHMHandle
    extras: dict[str, Any]


class Pair(NamedTuple):
    left: torch.Tensor
    right: int


def test_process_tensors_in_object_move_and_replace() -> None:
    package = Package(1, torch.ones(3), {"a": [torch.zeros(2)], "b": Pair(torch.ones(1), 3)})
    moved = process_tensors_in_object(package, mode="move")
    assert moved is package and package.weights.is_shared()  # type: ignore[union-attr]
    replaced = process_tensors_in_object(package, mode="replace")
    assert isinstance(replaced.weights, SHMHandle)
    assert isinstance(replaced.extras["a"][0], SHMHandle)
    assert isinstance(replaced.extras["b"], Pair) and replaced.extras["b"].right == 3
    assert isinstance(package.weights, torch.Tensor)  # the original is untouched
    rebuilt = reconstruct_from_shared_memory(replaced, package)
    assert rebuilt.weights is package.weights
    assert rebuilt.extras["b"].left is package.extras["b"].left
    with pytest.raises(ValueError, match="mode must be"):
        process_tensors_in_object(package, mode="copy")  # type: ignore[arg-type]


def test_reconstruct_keeps_parts_the_buffer_lacks() -> None:
    buffer = Package(-1, torch.zeros(2), {})
    result = Package(7, SHMHandle(), {"loss": 0.5, "hist": [1, 2]})
    rebuilt = reconstruct_from_shared_memory(result, buffer)
    assert rebuilt.cid == 7 and rebuilt.weights is buffer.weights
    assert rebuilt.extras == {"loss": 0.5, "hist": [1, 2]}
    with pytest.raises(ValueError, match=r"extras\['x'\]"):
        reconstruct_from_shared_memory(Package(1, SHMHandle(), {"x": SHMHandle()}), buffer)


def test_filtered_dataset() -> None:
    data = FilteredDataset([2, 0], ["a", "b", "c"], [0, 1, 2], str.upper, lambda t: t * 10)
    assert len(data) == 2 and data[0] == ("C", 20) and data[1] == ("A", 0)
    assert FilteredDataset([1], [5, 6])[0] == 6
    with pytest.raises(ValueError, match="same length"):
        FilteredDataset([0], [1, 2], [1])


def test_intra_op_threads_restores_the_setting() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError), intra_op_threads(0):
        pass


DTYPES = [torch.float32, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
        min_size=0,
        max_size=5,
    )
)
def test_transport_roundtrip_any_dtype(specs: list[tuple[torch.dtype, list[int]]]) -> None:
    from emberfl.arena import ParamArena

    g = torch.Generator().manual_seed(len(specs))
    tensors = [(torch.randn(shape, generator=g) * 50).to(dtype) for dtype, shape in specs]
    package = {"items": tensors, "meta": "x"}
    skeleton, layout, found = pack(package)
    assert len(found) == len(tensors)
    assert all(e.byte_offset % 64 == 0 for e in layout.entries)
    with ParamArena.from_model({"packed": torch.zeros(layout.num_floats)}, 2) as arena:
        write_tensors(layout, arena.slot(1), found)
        view = unpack(skeleton, layout, arena.slot(1), clone=False)
        copy = unpack(skeleton, layout, arena.slot(1), clone=True)
        for original, shared, private in zip(tensors, view["items"], copy["items"], strict=True):
            assert shared.dtype == original.dtype and torch.equal(shared, original)
            assert torch.equal(private, original)
        assert view["meta"] == "x"
        if tensors and tensors[0].numel():
            assert view["items"][0].untyped_storage().data_ptr() == arena.core.data_address


def test_adopt_tensors_copies_replacements_and_rejects_mismatches() -> None:
    from emberfl.arena import ParamArena

    skeleton, layout, _ = pack(Package(-1, torch.zeros(3), {}))
    with ParamArena.from_model({"packed": torch.zeros(layout.num_floats)}, 1) as arena:
        buffer = unpack(skeleton, layout, arena.slot(0), clone=False)
        buffer.weights = torch.full((3,), 2.0)
        adopt_tensors(buffer, layout, arena.slot(0), cid=3, what="uplink buffer")
        assert torch.equal(
            unpack(skeleton, layout, arena.slot(0), clone=True).weights, buffer.weights
        )
        buffer.weights = torch.zeros(4)
        with pytest.raises(TensorMismatchError, match=r"client 3 .*\(4,\).*'weights'"):
            adopt_tensors(buffer, layout, arena.slot(0), cid=3, what="uplink buffer")
