"""Faster CPU layers for the small CNNs of FL papers, as drop-in modules.

PyTorch's CPU max pooling of contiguous (NCHW) float32 tensors runs one scalar loop per
output element; for the 2x2 pools of LeNet-style CNNs it costs as much as a convolution
(about 1.5 ms of an 8 ms training step of the CIFAR-10 tutorial CNN at batch 50).
:class:`MaxPool2d` computes the same thing with emberfl's Rust kernel:

* **Same results, bit for bit**: the forward values, the arg-max of every window (first
  maximum, NaN propagates) and the backward pass (gradients routed to the arg-max, summed
  in PyTorch's order where windows overlap) equal ``torch.nn.MaxPool2d``'s.
* **When it applies**: float32 tensors on the CPU, 3-D or 4-D, with ``padding=0``,
  ``dilation=1``, ``ceil_mode=False`` and ``return_indices=False``; anything else runs
  ``torch.nn.MaxPool2d`` unchanged. It works with autograd (not double backward) and under
  :func:`torch.func.vmap`; under :func:`torch.func.grad` it falls back to PyTorch's.
* **Threads**: ``torch.get_num_threads()``, like PyTorch's own kernels.

:func:`use_fast_layers` swaps the pools of an existing model in place; emberfl's FedAvg
trainers and server do this to their own models by default (``fast_layers=True``).
:func:`pool_before_relu` rewrites ``max_pool(relu(x))`` as ``relu(max_pool(x))`` (also bitwise
the same, a quarter of the ReLU work); the vectorized execution mode applies both to its
private copy of the model.

:class:`Dropout` is ``torch.nn.Dropout`` drawing its masks from a generator of its own
instead of PyTorch's global one: emberfl's executors give each client its own, from the
client's stream (:func:`prepare_dropout`), so dropout is reproducible in threads and
the vectorized mode draws the very same masks (:func:`dropout_mask`).

Example:
    >>> import torch
    >>> from emberfl.nn import MaxPool2d
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.equal(MaxPool2d(2, 2)(x), torch.nn.MaxPool2d(2, 2)(x))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._C import _functorch

from emberfl import _core

__all__ = [
    "LSTM",
    "Dropout",
    "MaxPool2d",
    "dropout_mask",
    "pool_before_relu",
    "prepare_dropout",
    "use_fast_layers",
]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def _planes(shape: torch.Size) -> int:
    return math.prod(shape[:-2])


def _pool_forward(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the last two dimensions of ``x``; return the values and the window arg-max."""
    x = x.detach().contiguous()
    *lead, h, w = x.shape
    oh = (h - kernel[0]) // stride[0] + 1
    ow = (w - kernel[1]) // stride[1] + 1
    out = torch.empty((*lead, oh, ow), dtype=x.dtype)
    argmax = torch.empty((*lead, oh, ow), dtype=torch.uint8)
    planes = _planes(x.shape)
    _core.max_pool2d_forward(
        x.view(planes, h, w).numpy(),
        kernel,
        stride,
        out.view(planes, oh, ow).numpy(),
        argmax.view(planes, oh, ow).numpy(),
        num_threads=torch.get_num_threads(),
    )
    return out, argmax


def _pool_backward(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input_shape: torch.Size,
    kernel: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """Route ``grad_out`` to the arg-max of every window; zeros elsewhere."""
    grad_in = torch.empty(input_shape, dtype=grad_out.dtype)
    h, w = input_shape[-2:]
    oh, ow = argmax.shape[-2:]
    planes = _planes(input_shape)
    _core.max_pool2d_backward(
        grad_out.detach().contiguous().view(planes, oh, ow).numpy(),
        argmax.view(planes, oh, ow).numpy(),
        kernel,
        stride,
        grad_in.view(planes, h, w).numpy(),
        num_threads=torch.get_num_threads(),
    )
    return grad_in


class _MaxPool2dFunction(torch.autograd.Function):
    """Autograd and vmap rules around the kernels (every leading dimension is a plane)."""

    @staticmethod
    def forward(
        x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _pool_forward(x, kernel, stride)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, kernel, stride = inputs
        ctx.input_shape = x.shape
        ctx.kernel = kernel
        ctx.stride = stride
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_argmax: Any) -> tuple[Any, None, None]:
        (argmax,) = ctx.saved_tensors
        return _pool_backward(grad_out, argmax, ctx.input_shape, ctx.kernel, ctx.stride), None, None

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        x: torch.Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        # The vmapped dimension is one more leading (plane) dimension.
        if in_dims[0] is None:
            x = x.unsqueeze(0).expand(int(info.batch_size), *x.shape)
        else:
            x = x.movedim(in_dims[0], 0)
        out, argmax = _MaxPool2dFunction.apply(x, kernel, stride)
        return (out, argmax), (0, 0)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` with emberfl's CPU kernel where it applies (see the module).

    Constructor arguments, attributes and results are ``torch.nn.MaxPool2d``'s.
    """

    def _fast(self) -> bool:
        kh, kw = _pair(self.kernel_size)
        sh, sw = _pair(self.stride if self.stride is not None else self.kernel_size)
        return (
            _pair(self.padding) == (0, 0)
            and _pair(self.dilation) == (1, 1)
            and not self.ceil_mode
            and not self.return_indices
            and kh * kw <= 256
            and min(kh, kw, sh, sw) > 0
        )

    def forward(self, input: torch.Tensor) -> Any:
        """Pool ``input`` like ``torch.nn.MaxPool2d``."""
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and input.dim() in (3, 4)
            and self._fast()
            and input.shape[-2] >= _pair(self.kernel_size)[0]
            and input.shape[-1] >= _pair(self.kernel_size)[1]
            # torch.func.grad/jvp wrap tensors in ways the kernels cannot read (vmap alone
            # is handled by the function's vmap rule).
            and not _functorch.is_gradtrackingtensor(input)
        ):
            kernel = _pair(self.kernel_size)
            stride = _pair(self.stride if self.stride is not None else self.kernel_size)
            out, _ = _MaxPool2dFunction.apply(input, kernel, stride)
            return out
        return super().forward(input)

    @classmethod
    def from_module(cls, module: nn.MaxPool2d) -> MaxPool2d:
        """Return a :class:`MaxPool2d` with ``module``'s settings and training flag."""
        twin = cls(
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            return_indices=module.return_indices,
            ceil_mode=module.ceil_mode,
        )
        twin.train(module.training)
        return twin


def use_fast_layers(model: nn.Module) -> int:
    """Replace ``model``'s ``torch.nn.MaxPool2d`` submodules by :class:`MaxPool2d`, in place.

    The model computes exactly what it did (values and gradients); its state dict is
    unchanged. Pools called through ``torch.nn.functional`` in ``forward`` are not touched.

    Args:
        model: The model.

    Returns:
        The number of modules replaced.
    """
    return _swap(model, nn.MaxPool2d, MaxPool2d.from_module)


def _swap(model: nn.Module, kind: type[nn.Module], make: Any) -> int:
    """Replace every submodule of exactly type ``kind`` by ``make(submodule)``."""
    swaps = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        # A module with hooks is left alone: they are attached to that object.
        if type(child) is kind and not _has_hooks(child)
    ]
    for module, name, child in swaps:
        setattr(module, name, make(child))
    return len(swaps)


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` that also runs under :func:`torch.func.vmap`.

    Outside functorch transforms it is ``torch.nn.LSTM`` (the fused kernel, bitwise the
    same). Under them (the vectorized execution mode's stacked clients, local DP-SGD's
    per-sample gradients), where PyTorch has no batching rule for the fused kernel, it
    computes the same equations with matrix products and element-wise operations (equal up
    to float rounding). Its parameters, state dict and outputs are ``torch.nn.LSTM``'s.
    Supported: ``batch_first=True``, one direction, no dropout or projection, tensors (not
    packed sequences).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        """Create the layers.

        Args:
            input_size: The width of the inputs.
            hidden_size: The hidden units of every layer.
            num_layers: The layers.
        """
        super().__init__(input_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(  # type: ignore[override]  # tensors only, not PackedSequence
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the layers, as ``torch.nn.LSTM`` does.

        Args:
            input: A batch of sequences ``(N, L, input_size)``.
            hx: The initial ``(h_0, c_0)``, each ``(num_layers, N, hidden_size)``; zeros if
                ``None``.

        Returns:
            The last layer's outputs ``(N, L, hidden_size)`` and the final ``(h_n, c_n)``.
        """
        if _functorch.peek_interpreter_stack() is None:
            out, state = super().forward(input, hx)
            return out, state
        x = input
        finals_h: list[torch.Tensor] = []
        finals_c: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{layer}")
            w_hh = getattr(self, f"weight_hh_l{layer}")
            bias = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
            gates_in = F.linear(x, w_ih, bias)
            if hx is None:
                h = x.new_zeros(x.shape[0], self.hidden_size)
                c = torch.zeros_like(h)
            else:
                h, c = hx[0][layer], hx[1][layer]
            steps: list[torch.Tensor] = []
            for t in range(x.shape[1]):
                i, f, g, o = (gates_in[:, t] + F.linear(h, w_hh)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                steps.append(h)
            x = torch.stack(steps, dim=1)
            finals_h.append(h)
            finals_c.append(c)
        return x, (torch.stack(finals_h), torch.stack(finals_c))


def dropout_mask(
    shape: tuple[int, ...] | torch.Size, p: float, generator: torch.Generator
) -> torch.Tensor:
    """Return the float32 mask ``Dropout`` multiplies by: ``1 / (1 - p)`` kept, 0 dropped.

    An element is kept when ``torch.rand(shape, generator=generator)`` is ``>= p``; the
    same generator state gives the same mask, in every execution mode.

    Args:
        shape: The input's shape.
        p: The probability of dropping an element, ``0 <= p < 1``.
        generator: A CPU generator (advanced by the draw).

    Returns:
        A CPU tensor of ``shape``.
    """
    keep = torch.rand(shape, generator=generator) >= p
    return keep.to(torch.float32) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` whose masks come from :attr:`generator` (see the module).

    Without a generator it behaves exactly as ``torch.nn.Dropout``. ``p = 1`` drops all.

    Attributes:
        generator: The CPU generator the masks are drawn from, or ``None``.
    """

    generator: torch.Generator | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Drop elements of ``input`` (training mode only)."""
        if not self.training or self.p == 0:
            return input
        if self.generator is None or self.p >= 1:
            return F.dropout(input, self.p, True, self.inplace)
        mask = dropout_mask(tuple(input.shape), self.p, self.generator)
        return input * mask.to(input.device, input.dtype)

    @classmethod
    def from_module(cls, module: nn.Dropout) -> Dropout:
        """Return a :class:`Dropout` with ``module``'s settings."""
        twin = cls(module.p, module.inplace)
        twin.train(module.training)
        return twin


def prepare_dropout(model: nn.Module, generator: Callable[[], torch.Generator]) -> int:
    """Swap ``model``'s ``torch.nn.Dropout`` for :class:`Dropout` and give every
    :class:`Dropout` a generator, in one walk; ``generator()`` is called only if there is one.

    Args:
        model: The model.
        generator: Makes the generator (called at most once).

    Returns:
        The number of :class:`Dropout` modules.
    """
    gen: torch.Generator | None = None
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout and not _has_hooks(child):
                child = Dropout.from_module(child)
                setattr(module, name, child)
            if isinstance(child, Dropout):
                if gen is None:
                    gen = generator()
                child.generator = gen
                count += 1
    return count


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


_RELU_FUNCTIONS = (torch.relu, F.relu)


def _is_relu(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1
    if node.op == "call_module" and isinstance(node.target, str):
        return type(module.get_submodule(node.target)) is nn.ReLU and not node.kwargs
    return False


def _is_max_pool(module: nn.Module, node: fx.Node) -> bool:
    if node.op != "call_module" or not isinstance(node.target, str):
        return False
    pool = module.get_submodule(node.target)
    return isinstance(pool, nn.MaxPool2d) and not pool.return_indices and len(node.args) == 1


def pool_before_relu(model: nn.Module) -> tuple[nn.Module, int]:
    """Rewrite ``max_pool(relu(x))`` as ``relu(max_pool(x))`` with :mod:`torch.fx`.

    The two are equal bit for bit, forward and backward: ReLU is monotone, so it commutes
    with the window maximum (NaN included), and the gradient reaching an input is the
    output gradient at that window's arg-max where the input is positive and zero
    elsewhere in both orders. The rewritten form runs ReLU, and its backward pass, on the
    pooled tensor, a quarter of the size for a 2x2 pool.

    Args:
        model: The model (not modified).

    Returns:
        ``(module, count)``: a ``torch.fx.GraphModule`` with the same parameter and
        buffer names and ``count`` rewritten pairs, or ``(model, 0)`` when nothing
        matched or the model cannot be traced symbolically (data-dependent control flow,
        for example).
    """
    try:
        traced = fx.symbolic_trace(model)
    except Exception:
        return model, 0
    if list(traced.state_dict()) != list(model.state_dict()):
        return model, 0
    graph = traced.graph
    count = 0
    for pool in list(graph.nodes):
        if not _is_max_pool(traced, pool):
            continue
        relu = pool.args[0]
        if not isinstance(relu, fx.Node) or not _is_relu(traced, relu) or len(relu.users) != 1:
            continue
        source = relu.args[0]
        # An in-place ReLU also changed its input for every other reader of it.
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        with graph.inserting_after(pool):
            after = graph.call_function(torch.relu, (pool,))
        pool.replace_all_uses_with(after, delete_user_cb=lambda user, new=after: user is not new)
        pool.args = (source,)
        graph.erase_node(relu)
        count += 1
    if count == 0:
        return model, 0
    graph.lint()
    traced.recompile()
    return traced, count
