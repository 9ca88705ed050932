"""emberfl.nn.MaxPool2d against torch.nn.MaxPool2d (bit for bit), its fallbacks and errors;
the batch iterator and the heap setting used by the fast paths."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from emberfl import _core
from emberfl.core.batches import iter_batches, tensor_dataset
from emberfl.core.heap import retain_freed_memory
from emberfl.errors import InvalidArgumentError, TensorMismatchError
from emberfl.executors.vectorized import default_chunk_size
from emberfl.models import Models
from emberfl.nn import MaxPool2d, pool_before_relu, use_fast_layers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality (NaNs and the sign of zero included)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bits(a), _bits(b))


def _pair_grads(
    fast: nn.Module, ref: nn.Module, x: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    a, b = fast(xa), ref(xb)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed))
    g[..., ::3] = -0.0  # a zeroed input gradient plus -0.0 is +0.0 in PyTorch
    (ga,) = torch.autograd.grad(a, xa, g)
    (gb,) = torch.autograd.grad(b, xb, g)
    return a, b, ga, gb


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 3),
    channels=st.integers(1, 4),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from(["none", "nan", "-inf", "ties"]),
)
def test_matches_torch_bit_for_bit(
    batch: int,
    channels: int,
    h: int,
    w: int,
    kernel: tuple[int, int],
    stride: tuple[int, int] | None,
    seed: int,
    special: str,
) -> None:
    if h < kernel[0] or w < kernel[1]:
        return
    gen = torch.Generator().manual_seed(seed)
    shape = (channels, h, w) if batch == 0 else (batch, channels, h, w)
    if special == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).float()  # many equal values
    else:
        x = torch.randn(shape, generator=gen)
    if special in ("nan", "-inf"):
        mask = torch.rand(shape, generator=gen) < 0.2
        x[mask] = float("nan") if special == "nan" else float("-inf")
    fast = MaxPool2d(kernel, stride)
    ref = nn.MaxPool2d(kernel, stride)
    a, b, ga, gb = _pair_grads(fast, ref, x, seed)
    _assert_same(a, b)
    _assert_same(ga, gb)


def test_the_cnn_pool_and_relu_pattern_matches() -> None:
    x = torch.randn(50, 6, 28, 28, generator=torch.Generator().manual_seed(1)).relu()
    a, b, ga, gb = _pair_grads(MaxPool2d(2, 2), nn.MaxPool2d(2, 2), x, 2)
    _assert_same(a, b)
    _assert_same(ga, gb)


def test_vmap_and_grad_transforms_match_torch() -> None:
    xs = torch.randn(3, 4, 2, 9, 9, generator=torch.Generator().manual_seed(3))
    fast, ref = MaxPool2d(3, 2), nn.MaxPool2d(3, 2)
    _assert_same(vmap(fast)(xs), vmap(ref)(xs))
    # vmap over an unbatched argument of another vmapped input
    _assert_same(vmap(fast, in_dims=1)(xs), vmap(ref, in_dims=1)(xs))
    xa = xs.clone().requires_grad_(True)
    xb = xs.clone().requires_grad_(True)
    a, b = vmap(fast)(xa), vmap(ref)(xb)
    g = torch.randn(a.shape)
    _assert_same(torch.autograd.grad(a, xa, g)[0], torch.autograd.grad(b, xb, g)[0])
    # torch.func.grad falls back to PyTorch's pooling: still the same numbers
    fa = vmap(grad(lambda t: fast(t).square().sum()))(xs)
    fb = vmap(grad(lambda t: ref(t).square().sum()))(xs)
    _assert_same(fa, fb)


@pytest.mark.parametrize(
    ("kwargs", "x"),
    [
        ({"kernel_size": 2, "padding": 1}, torch.randn(2, 3, 7, 7)),
        ({"kernel_size": 2, "ceil_mode": True}, torch.randn(2, 3, 7, 7)),
        ({"kernel_size": 3, "dilation": 2}, torch.randn(2, 3, 9, 9)),
        ({"kernel_size": 2}, torch.randn(2, 3, 8, 8, dtype=torch.float64)),
        ({"kernel_size": 2}, torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)),
        ({"kernel_size": 2}, torch.randn(2, 3, 8, 8)[:, :, ::2, ::2]),
        ({"kernel_size": 17}, torch.randn(1, 1, 20, 20)),  # 289 positions: PyTorch's
    ],
)
def test_fallbacks_and_layouts_give_torch_results(
    kwargs: dict[str, object], x: torch.Tensor
) -> None:
    fast, ref = MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)  # type: ignore[arg-type]
    a, b, ga, gb = _pair_grads(fast, ref, x, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_return_indices_is_torch_behaviour() -> None:
    x = torch.randn(1, 2, 6, 6)
    out, idx = MaxPool2d(2, return_indices=True)(x)
    ref_out, ref_idx = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


def test_too_small_input_raises_like_torch() -> None:
    with pytest.raises(RuntimeError):
        nn.MaxPool2d(3)(torch.randn(1, 1, 2, 2))
    with pytest.raises(RuntimeError):
        MaxPool2d(3)(torch.randn(1, 1, 2, 2))


def test_use_fast_layers_keeps_the_model() -> None:
    torch.manual_seed(0)
    model = Models(input_shape=(3, 32, 32), num_classes=10, seed=0).select_model("cnn")
    hooked = nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda *_: None)
    model.add_module("extra", nn.Sequential(nn.MaxPool2d(2), hooked))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    assert use_fast_layers(model) == 2  # the CNN's pool and the unhooked one
    assert type(model.pool) is MaxPool2d  # type: ignore[comparison-overlap]
    assert type(model.extra[1]) is nn.MaxPool2d  # hooks: left alone
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    _assert_same(model(x), expected)
    assert use_fast_layers(model) == 0


def test_kernel_rejects_bad_buffers() -> None:
    x = np.zeros((2, 4, 4), np.float32)
    out = np.zeros((2, 2, 2), np.float32)
    arg = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(TensorMismatchError, match="out has 4 elements, expected 8"):
        _core.max_pool2d_forward(x, (2, 2), (2, 2), out[:1], arg, num_threads=1)
    with pytest.raises(InvalidArgumentError, match="smaller than the 5x5 kernel"):
        _core.max_pool2d_forward(x, (5, 5), (1, 1), out, arg, num_threads=1)
    with pytest.raises(InvalidArgumentError, match="must be positive"):
        _core.max_pool2d_forward(x, (2, 2), (0, 2), out, arg, num_threads=1)
    with pytest.raises(InvalidArgumentError, match="num_threads=0"):
        _core.max_pool2d_forward(x, (2, 2), (2, 2), out, arg, num_threads=0)
    gi = np.full((2, 4, 4), 7.0, np.float32)
    bad = np.full((2, 2, 2), 4, np.uint8)
    with pytest.raises(InvalidArgumentError, match="arg-max 4 is outside the 2x2 window"):
        _core.max_pool2d_backward(out, bad, (2, 2), (2, 2), gi, num_threads=1)
    with pytest.raises(InvalidArgumentError, match="arg-max 9 is outside the 3x3 window"):
        _core.max_pool2d_backward(
            np.zeros((2, 2, 2), np.float32),
            np.full((2, 2, 2), 9, np.uint8),
            (3, 3),
            (1, 1),
            gi,
            num_threads=1,
        )


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_is_independent_of_threads(threads: int) -> None:
    x = torch.randn(64, 3, 20, 20, generator=torch.Generator().manual_seed(5))
    ref = nn.MaxPool2d(2)(x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_same(MaxPool2d(2)(x), ref)
    finally:
        torch.set_num_threads(previous)


# -- batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iter_batches_equals_the_loader(shuffle: bool, drop_last: bool) -> None:
    data = TensorDataset(torch.randn(23, 3, 4, 4), torch.arange(23))

    def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(
            data,
            batch_size=5,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(9),
        )

    plain, fast = loader(), loader()
    assert tensor_dataset(fast) is data
    want = list(plain)
    got = list(iter_batches(fast))
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    # the generators were drawn from identically
    assert torch.equal(plain.generator.get_state(), fast.generator.get_state())  # type: ignore[union-attr]


def test_iter_batches_passes_other_loaders_through() -> None:
    data = TensorDataset(torch.randn(6, 2), torch.arange(6))
    loader = DataLoader(data, batch_size=4, collate_fn=lambda b: len(b))
    assert tensor_dataset(loader) is None
    assert list(iter_batches(loader)) == [4, 2]


# -- chunking and memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clients", "parallels", "expected"),
    [(100, 1, 25), (100, 2, 25), (100, 3, 17), (10, 1, 10), (10, 4, 3), (1, 2, 1), (64, 2, 32)],
)
def test_default_chunk_size(clients: int, parallels: int, expected: int) -> None:
    chunk = default_chunk_size(clients, parallels)
    assert chunk == expected
    chunks = -(-clients // chunk)
    assert chunk <= 32 and (chunks % parallels == 0 or chunks < parallels)


def test_retain_freed_memory_on_glibc() -> None:
    result = retain_freed_memory()
    assert retain_freed_memory() is result  # once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert result is True


# -- pool_before_relu ------------------------------------------------------------------------


class _Patterns(nn.Module):
    """ReLU-then-pool in every spelling, plus pairs that must not be rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool(torch.relu(self.conv(x)))  # function form
        b = self.pool3(self.relu(self.conv(x)))  # module form, overlapping windows
        c = self.pool(torch.nn.functional.relu(self.conv(x)))  # F.relu
        shared = torch.relu(self.conv(x))
        d = self.pool(shared) + shared[..., ::2, ::2]  # relu has two users: kept
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1), d.flatten(1)], 1)


def test_pool_before_relu_is_bitwise_the_same() -> None:
    torch.manual_seed(0)
    model = _Patterns()
    rewritten, count = pool_before_relu(model)
    assert count == 3
    assert list(rewritten.state_dict()) == list(model.state_dict())
    use_fast_layers(rewritten)
    for seed, special in [(1, "none"), (2, "ties"), (3, "nan")]:
        gen = torch.Generator().manual_seed(seed)
        if special == "ties":
            x = torch.randint(-2, 3, (3, 2, 8, 8), generator=gen).float()
        else:
            x = torch.randn(3, 2, 8, 8, generator=gen)
        if special == "nan":
            x[0, 0, 1, 1] = float("nan")
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ya, yb = model(xa), rewritten(xb)
        _assert_same(ya, yb)
        g = torch.randn(ya.shape, generator=gen)
        ga = torch.autograd.grad(ya, [xa, *model.parameters()], g)
        gb = torch.autograd.grad(yb, [xb, *rewritten.parameters()], g)
        for u, v in zip(ga, gb, strict=True):
            _assert_same(u, v)


def test_pool_before_relu_leaves_untraceable_models_alone() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: symbolic tracing fails
                return self.pool(torch.relu(x))
            return x

    model = Branchy()
    assert pool_before_relu(model) == (model, 0)
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    assert pool_before_relu(plain) == (plain, 0)
