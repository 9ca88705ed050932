"""The shared-memory parameter arena: layout, views, sharing across processes, bad input."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from emberfl import errors
from emberfl.arena import ArenaHandle, ParamArena


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1)[:, :16])


def memfd_count() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "memfd:emberfl-arena" in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("emberfl-*")}


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture
def arena(net: SmallNet) -> Iterator[ParamArena]:
    with ParamArena.from_model(net, num_slots=3) as a:
        yield a


def test_layout_follows_state_dict(net: SmallNet, arena: ParamArena) -> None:
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    assert [e.name for e in arena.layout] == list(floats)
    assert arena.dim == sum(v.numel() for v in floats.values())
    assert arena.skipped == ("bn.num_batches_tracked",)
    offsets = [e.offset for e in arena.layout]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert arena.tensor.shape == (3, arena.dim)
    assert arena.name_of(0) == "conv.weight"
    assert arena.name_of(arena.dim - 1) == "fc.bias"


def test_store_load_round_trip(net: SmallNet, arena: ParamArena) -> None:
    arena.store(1, net)
    other = SmallNet()
    other.bn.num_batches_tracked.fill_(5)
    arena.load(1, other)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        if k == "bn.num_batches_tracked":
            assert int(b) == 5  # integer buffers are not stored, and left untouched
        else:
            assert torch.equal(a, b), k


def test_views_are_zero_copy(arena: ParamArena) -> None:
    views = arena.state_dict(2)
    views["fc.bias"].fill_(7.0)
    e = next(e for e in arena.layout if e.name == "fc.bias")
    assert arena.slot(2)[e.offset : e.offset + e.numel].tolist() == [7.0] * 3
    assert views["conv.weight"].shape == (4, 1, 3, 3)
    assert arena.slot(2).data_ptr() == arena.tensor[2].data_ptr()
    assert arena.slot(0).sum().item() == 0.0  # created zero-filled


def test_store_casts_dtype_and_accepts_state_dict(net: SmallNet, arena: ParamArena) -> None:
    sd = {k: v.double() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    arena.store(0, sd)
    assert torch.equal(arena.state_dict(0)["fc.weight"], net.fc.weight.detach())
    half = SmallNet().half()
    arena.load(0, half)
    assert half.fc.weight.dtype == torch.float16
    assert torch.allclose(half.fc.weight.float(), net.fc.weight.detach(), atol=1e-3)


def test_copy_slot(net: SmallNet, arena: ParamArena) -> None:
    arena.store(0, net)
    arena.copy_slot(0, 2)
    assert torch.equal(arena.slot(0), arena.slot(2))


def test_view_outlives_arena(net: SmallNet) -> None:
    arena = ParamArena.from_model(net, num_slots=2)
    arena.store(1, net)
    view = arena.state_dict(1)["fc.weight"]
    expected = net.fc.weight.detach().clone()
    arena.close()
    del arena
    gc.collect()
    # The mapping lives as long as the view: reads and writes still work.
    assert torch.equal(view, expected)
    view.add_(1.0)
    assert torch.equal(view, expected + 1.0)


def test_no_leak_after_close() -> None:
    gc.collect()
    before = memfd_count()
    arenas = [ParamArena.from_model({"w": torch.zeros(10)}, 2) for _ in range(5)]
    assert memfd_count() == before + 5
    for a in arenas:
        a.close()
    del arenas, a
    gc.collect()
    assert memfd_count() == before


def _child_write(handle: ArenaHandle, value: float) -> None:
    arena = ParamArena.attach(handle)
    assert torch.all(arena.slot(0) == 1.5)  # sees the parent's write
    arena.slot(1).fill_(value)


def _child_create(queue: mp.Queue) -> None:  # type: ignore[type-arg]
    arena = ParamArena.from_model({"w": torch.zeros(4)}, 1)
    arena.slot(0).fill_(3.0)
    queue.put(arena.handle)


@pytest.mark.parametrize("backing", ["memfd", "shm"])
def test_attach_from_spawned_process(backing: str) -> None:
    before = shm_files()
    arena = ParamArena.from_model({"a": torch.zeros(5, 2), "b": torch.zeros(3)}, 2, backing=backing)  # type: ignore[arg-type]
    arena.slot(0).fill_(1.5)
    handle = pickle.loads(pickle.dumps(arena.handle))
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_child_write, args=(handle, 42.0))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert torch.all(arena.slot(1) == 42.0)
    if backing == "shm":
        assert len(shm_files() - before) == 1
    arena.close()
    gc.collect()
    assert shm_files() == before


def test_handle_of_dead_process_is_stale() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_create, args=(q,))
    p.start()
    handle = q.get(timeout=60)
    p.join(60)
    with pytest.raises(errors.StaleHandleError, match="no longer exists"):
        ParamArena.attach(handle)


def test_foreign_handle_is_refused(arena: ParamArena) -> None:
    kind, pid, fd, path, t0, t1, n, d = arena.handle.raw
    forged = ArenaHandle((kind, pid, fd, path, t0 ^ 1, t1, n, d), arena.layout, arena.skipped)
    with pytest.raises(errors.StaleHandleError, match="token mismatch"):
        ParamArena.attach(forged)
    wrong_size = ArenaHandle((kind, pid, fd, path, t0, t1, n + 1, d), arena.layout, arena.skipped)
    with pytest.raises(errors.StaleHandleError):
        ParamArena.attach(wrong_size)
    # An fd of this process that is not an arena at all.
    with open(__file__) as f:
        other = ArenaHandle((kind, pid, f.fileno(), path, t0, t1, n, d), arena.layout, ())
        with pytest.raises(errors.StaleHandleError):
            ParamArena.attach(other)
    with pytest.raises(TypeError, match="ArenaHandle"):
        ParamArena.attach(arena.handle.raw)  # type: ignore[arg-type]


def test_attach_after_unlink_is_stale() -> None:
    a = ParamArena.from_model({"w": torch.zeros(4)}, 1, backing="shm")
    h = a.handle
    a.unlink()
    with pytest.raises(errors.StaleHandleError):
        ParamArena.attach(h)
    a.close()


def test_too_large_for_dev_shm_is_a_clear_error() -> None:
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    floats = total // 4 + 1024
    before = shm_files()
    with pytest.raises(errors.SharedMemoryError, match="cannot reserve") as info:
        ParamArena.from_model({"w": torch.zeros(1024)}, num_slots=floats // 1024 + 1, backing="shm")
    assert isinstance(info.value, OSError)
    assert shm_files() == before  # nothing left behind


def test_too_large_for_memory_is_a_clear_error() -> None:
    with pytest.raises(errors.SharedMemoryError, match="memfd"):
        ParamArena.from_model({"w": torch.zeros(1 << 20)}, num_slots=1 << 20)


def test_bad_slot_indices(arena: ParamArena) -> None:
    with pytest.raises(errors.SlotIndexError, match="slot 3 is out of range: the arena has 3"):
        arena.slot(3)
    with pytest.raises(IndexError):
        arena.state_dict(-1)
    with pytest.raises(errors.InvalidArgumentError, match="slot index must be an integer"):
        arena.slot("0")  # type: ignore[arg-type]
    assert arena.slot(torch.tensor(1)).shape == (arena.dim,)  # type: ignore[arg-type]


def test_layout_mismatch(net: SmallNet, arena: ParamArena) -> None:
    sd = dict(net.state_dict())
    del sd["fc.bias"]
    with pytest.raises(errors.LayoutMismatchError, match=r"lacks 'fc\.bias'"):
        arena.store(0, sd)
    sd = dict(net.state_dict())
    sd["extra"] = torch.zeros(2)
    with pytest.raises(errors.LayoutMismatchError, match="unexpected tensor 'extra'"):
        arena.store(0, sd)
    sd = dict(net.state_dict())
    sd["fc.weight"] = torch.zeros(3, 17)
    with pytest.raises(errors.TensorMismatchError, match=r"'fc.weight' has shape \(3, 17\)"):
        arena.store(0, sd)
    sd = dict(net.state_dict())
    sd["fc.bias"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(errors.TensorMismatchError, match="floating-point"):
        arena.store(0, sd)
    with pytest.raises(errors.LayoutMismatchError):
        arena.load(0, torch.nn.Linear(2, 2))
    # Nothing was written by the failed stores.
    assert arena.slot(0).abs().sum().item() == 0.0


def test_closed_arena(arena: ParamArena) -> None:
    arena.close()
    assert arena.closed
    with pytest.raises(errors.ArenaError, match="closed"):
        arena.slot(0)
    arena.close()  # idempotent


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="num_slots must be a positive integer, got 0"):
        ParamArena.from_model({"w": torch.zeros(2)}, 0)
    with pytest.raises(ValueError, match="unknown backing"):
        ParamArena.from_model({"w": torch.zeros(2)}, 1, backing="gpu")  # type: ignore[arg-type]
    with pytest.raises(errors.LayoutMismatchError, match="no floating-point"):
        ParamArena.from_model({"n": torch.zeros(2, dtype=torch.int64)}, 1)


def test_named_arena_unlinked_when_collected() -> None:
    before = shm_files()
    a = ParamArena.from_model({"w": torch.zeros(4)}, 1, backing="shm")
    view = a.slot(0)
    assert len(shm_files() - before) == 1
    del a
    gc.collect()
    assert shm_files() == before  # unlinked although a view is still alive
    view.fill_(1.0)


def _drop_inherited_arena(holder: list[ParamArena]) -> None:
    holder.clear()  # the forked copy of the parent's arena: collected here
    gc.collect()


def test_a_forked_child_does_not_unlink_the_parents_named_arena() -> None:
    before = shm_files()
    holder = [ParamArena.from_model({"w": torch.zeros(4)}, 1, backing="shm")]
    holder[0].slot(0).fill_(3.0)
    child = mp.get_context("fork").Process(target=_drop_inherited_arena, args=(holder,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert len(shm_files() - before) == 1  # still there for the parent ...
    again = ParamArena.attach(holder[0].handle)
    assert torch.equal(again.slot(0), torch.full((4,), 3.0))
    again.close()
    holder.clear()
    gc.collect()
    assert shm_files() == before  # ... which unlinks it when it collects its arena
