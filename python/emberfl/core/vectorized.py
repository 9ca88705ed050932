"""Vectorized execution: train many clients of one architecture at once on one device.

The per-client execution modes run one model per client, so every client pays Python,
autograd and kernel-launch overhead of its own. This module trains ``C`` clients as one
*stacked* model instead: every trainable parameter gets a leading client dimension, the
model's forward pass runs under :func:`torch.func.vmap` over
:func:`torch.func.functional_call`, and one backward pass of the sum of the clients' losses
gives every client its own gradient (the clients share no parameter, so the gradient of
the sum with respect to client ``c``'s slice is client ``c``'s gradient).

The pieces, used by :class:`emberfl.executors.VectorizedExecutor`:

* :class:`VectorizedModel` — a model's functional, stacked form: stack flat parameter
  vectors into per-client tensors, compute per-client gradients of a padded, masked batch
  (with per-client BatchNorm statistics and dropout masks), and fill the clients' flat rows.
* :class:`StackedSGD` — ``torch.optim.SGD``'s update (momentum, dampening, Nesterov,
  weight decay) on stacked parameters, with per-client state and a per-client "active"
  mask so that a client with fewer local steps is left untouched on padded steps.
* :func:`stack_batches` — pads and stacks one step's mini-batches of ``C`` clients, with
  per-sample loss weights ``1 / n`` for the ``n`` real samples of each client's batch (so
  a short last batch averages its loss over its real samples only, as ``mean`` does).
* :func:`check_vectorizable` / :func:`check_homogeneous` — the clear errors.

Which layers work: everything :func:`torch.func.vmap` supports, plus the two layers FL
models most often have that keep or draw per-client state:

* ``BatchNorm1d/2d/3d``: each client keeps its own running statistics (they are part of its
  flat state, updated by the forward pass), and a step never mixes batches of different
  sizes, so batch statistics never see padding (the executor runs such steps per size);
* ``Dropout``: each client's masks come from its own stream
  (:meth:`~emberfl.algorithms.Client.dropout_generator`), drawn in the order a per-client
  forward pass draws them, so they are the masks :class:`emberfl.nn.Dropout` draws in the
  per-client modes.

Rejected with a :class:`~emberfl.errors.ConfigError` naming the layer: ``SyncBatchNorm``,
BatchNorm with ``momentum=None``, ``InstanceNorm(track_running_stats=True)`` and dropout
variants other than ``Dropout`` (``Dropout2d``, ``AlphaDropout``, ...) with ``p > 0``.

On CPU, convolutions with per-client weights are computed client by client inside the
vmapped forward (``conv="loop"``, one small cache-resident oneDNN call per client; the
batched alternative, a grouped convolution with ``groups = C``, is 1.5-2x slower on CPU);
on CUDA the grouped convolution is used (``conv="grouped"``). ``torch.nn.MaxPool2d``
modules run emberfl's CPU kernel (:class:`emberfl.nn.MaxPool2d`: same values and
gradients, several times faster for the 2x2 pools of small CNNs), and ``max_pool(relu(x))``
is rewritten as ``relu(max_pool(x))`` (:func:`emberfl.nn.pool_before_relu`, also bitwise
the same) so that ReLU runs on the pooled tensor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from emberfl.errors import ConfigError, TensorMismatchError
from emberfl.nn import pool_before_relu, use_fast_layers

__all__ = [
    "ConvMode",
    "StackedAdam",
    "StackedSGD",
    "VectorizedModel",
    "check_homogeneous",
    "check_vectorizable",
    "stack_batches",
]

ConvMode = Literal["auto", "loop", "grouped"]
"""How convolutions with per-client weights run: ``"loop"`` (client by client inside the
vmapped forward), ``"grouped"`` (one grouped convolution) or ``"auto"`` (loop on CPU,
grouped elsewhere)."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-sample loss: ``(outputs (N, ...), targets (N, ...)) -> losses (N,)``."""


def _per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# -- errors ------------------------------------------------------------------------------


def check_vectorizable(model: nn.Module) -> None:
    """Raise if ``model`` has a layer that vectorized training cannot run exactly.

    BatchNorm (each client keeps its own running statistics, and a step never mixes
    clients' batches) and ``Dropout`` (each client draws its masks from its own stream)
    are supported.

    Args:
        model: The model (its class and submodules are inspected, not run).

    Raises:
        ConfigError: For ``SyncBatchNorm``, a BatchNorm with ``momentum=None``, an
            instance-norm layer with running statistics or a dropout variant other than
            ``Dropout`` with ``p > 0``; the message names the layer.
    """
    from emberfl.nn import Dropout as ClientDropout

    for name, module in model.named_modules():
        where = f"layer {name or '<root>'!r} ({type(module).__name__})"
        if isinstance(module, nn.SyncBatchNorm):
            raise ConfigError(
                f"{where}: SyncBatchNorm synchronises statistics across processes; use "
                "BatchNorm (each client keeps its own statistics) or a per-client mode"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            raise ConfigError(
                f"{where}: BatchNorm with momentum=None (a cumulative average) is not "
                "supported by vectorized training; set a momentum or use a per-client mode"
            )
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and (
            module.track_running_stats
        ):
            raise ConfigError(
                f"{where}: InstanceNorm with track_running_stats=True keeps per-client "
                "running statistics, which vectorized training does not support; set "
                "track_running_stats=False or use a per-client mode"
            )
        plain = type(module) in (nn.Dropout, ClientDropout)
        if (
            isinstance(module, nn.modules.dropout._DropoutNd | nn.AlphaDropout)
            and not plain
            and module.p > 0
        ):
            raise ConfigError(
                f"{where}: {type(module).__name__} with p={module.p} is not supported by "
                "vectorized training (only element-wise Dropout draws per-client masks); "
                "use Dropout, p=0, or a per-client mode"
            )


def check_homogeneous(models: Sequence[nn.Module]) -> None:
    """Raise unless every model has the first one's class and state-dict layout.

    Args:
        models: The clients' models.

    Raises:
        ConfigError: If the list is empty or a model differs (class, tensor names, shapes
            or dtypes); the message names the first difference.
    """
    if not models:
        raise ConfigError("check_homogeneous needs at least one model")
    ref = models[0]
    ref_state = ref.state_dict()
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(ref):
            raise ConfigError(
                f"vectorized training needs one architecture: model {i} is a "
                f"{type(model).__name__}, model 0 a {type(ref).__name__}"
            )
        state = model.state_dict()
        if list(state) != list(ref_state):
            missing = [k for k in ref_state if k not in state]
            extra = [k for k in state if k not in ref_state]
            raise ConfigError(
                f"vectorized training needs one architecture: model {i}'s tensors differ "
                f"from model 0's (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for key, t in state.items():
            r = ref_state[key]
            if t.shape != r.shape or t.dtype != r.dtype:
                raise ConfigError(
                    f"vectorized training needs one architecture: {key!r} of model {i} "
                    f"has shape {tuple(t.shape)} and {t.dtype}, model 0's "
                    f"{tuple(r.shape)} and {r.dtype}"
                )


# -- convolutions client by client ---------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@torch.library.custom_op("emberfl::per_client_conv", mutates_args=())
def _per_client_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """An ordinary convolution whose vmap rule loops over the clients (see below)."""
    conv = _CONV[weight.dim() - 2]
    return conv(x, weight, bias, stride, padding, dilation, groups)


def _per_client_conv_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, int]:
    # Runs on the physical (unbatched) tensors, below vmap and above autograd: the
    # autograd graph records one ordinary convolution per client. ``unbind`` (not
    # ``select``) keeps the backward pass to one ``stack`` per input.
    n = int(info.batch_size)
    conv = _CONV[weight.dim() - 2 - (in_dims[1] is not None)]
    xs = x.unbind(in_dims[0]) if in_dims[0] is not None else (x,) * n
    ws = weight.unbind(in_dims[1]) if in_dims[1] is not None else (weight,) * n
    if bias is None:
        bs: Sequence[torch.Tensor | None] = (None,) * n
    else:
        bs = bias.unbind(in_dims[2]) if in_dims[2] is not None else (bias,) * n
    outs = [
        conv(xc, wc, bc, stride, padding, dilation, groups)
        for xc, wc, bc in zip(xs, ws, bs, strict=True)
    ]
    return torch.stack(outs), 0


_per_client_conv.register_vmap(_per_client_conv_vmap)


class _LoopConv(nn.Module):
    """A ``ConvNd`` whose per-client weights run client by client under vmap."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = list(conv.stride)
        self.padding = [int(p) for p in conv.padding]
        self.dilation = list(conv.dilation)
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _per_client_conv(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return out


def _swap_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if (
            isinstance(child, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            and child.padding_mode == "zeros"
            and not isinstance(child.padding, str)
        ):
            setattr(module, name, _LoopConv(child))
        else:
            _swap_convs(child)


# -- linear layers with row-major weight gradients -----------------------------------------


@torch.library.custom_op("emberfl::per_client_linear", mutates_args=())
def _per_client_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """An ordinary linear layer whose vmap rule keeps weight gradients row-major."""
    return F.linear(x, weight, bias)


def _per_client_linear_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    # Runs on the physical tensors, below vmap and above autograd. ``y^T = W x^T`` makes
    # autograd's weight gradient ``grad_y^T x``, a row-major (C, out, in) tensor like the
    # parameters; vmap's own rule for ``x W^T`` gives its transpose, and an optimiser step
    # over transposed gradients is several times slower (it walks memory out of order).
    n = int(info.batch_size)
    if in_dims[1] is None:
        xs = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(n, *x.shape)
        b = (
            None
            if bias is None
            else (bias.movedim(in_dims[2], 0) if in_dims[2] is not None else bias)
        )
        out = F.linear(xs, weight, None)
        if b is not None:
            out = out + (b.view(n, *([1] * (out.dim() - 2)), -1) if in_dims[2] is not None else b)
        return out, 0
    w = weight.movedim(in_dims[1], 0)
    xs = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.unsqueeze(0).expand(n, *x.shape)
    lead = xs.shape[1:-1]
    flat = xs.reshape(n, -1, xs.shape[-1])
    out = torch.bmm(w, flat.transpose(1, 2)).transpose(1, 2)
    if bias is not None:
        b = bias.movedim(in_dims[2], 0) if in_dims[2] is not None else bias.expand(n, -1)
        out = out + b.unsqueeze(1)
    return out.reshape(n, *lead, w.shape[1]), 0


_per_client_linear.register_vmap(_per_client_linear_vmap)


class _RowMajorLinear(nn.Module):
    """A ``Linear`` whose per-client weight gradients come out row-major under vmap."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _per_client_linear(x, self.weight, self.bias)
        return out


ROW_MAJOR_LINEAR_MIN = 1 << 16
"""Linear layers with at least this many weights run as :class:`_RowMajorLinear`; smaller
ones keep vmap's own rule (the custom operator's dispatch costs more than it saves)."""


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear and child.weight.numel() >= ROW_MAJOR_LINEAR_MIN:
            setattr(module, name, _RowMajorLinear(child))
        else:
            _swap_linears(child)


# -- dropout with per-client masks ---------------------------------------------------------


class _StackedDropout(nn.Module):
    """Dropout whose mask is a buffer: each client's own mask arrives through
    :func:`~torch.func.functional_call` under vmap (drawn from its stream by the executor)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.register_buffer("mask", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask: torch.Tensor = self.mask  # type: ignore[assignment]
        return x * mask


def _swap_dropouts(module: nn.Module) -> None:
    from emberfl.nn import Dropout as ClientDropout

    for name, child in module.named_children():
        if isinstance(child, nn.Dropout) and type(child) in (nn.Dropout, ClientDropout):
            if child.p > 0:
                setattr(module, name, _StackedDropout(child.p))
        else:
            _swap_dropouts(child)


@dataclass(frozen=True)
class DropoutCall:
    """One dropout layer of a forward pass, in call order.

    Attributes:
        key: The name of its mask in the ``functional_call`` dict.
        p: Its drop probability.
        shape: One sample's input shape at that layer.
    """

    key: str
    p: float
    shape: tuple[int, ...]


# -- the stacked model -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    kind: Literal["param", "stat", "count", "fixed"]

    @property
    def trainable(self) -> bool:
        return self.kind == "param"


class VectorizedModel:
    """A model's stacked, functional form for training ``C`` clients at once.

    Parameters are handled as ``name -> (C, *shape)`` tensors; the flat layout is
    :func:`~emberfl.core.serialize_model`'s (the state dict's order). Trainable parameters
    and BatchNorm running statistics are per client (the statistics are updated by the
    forward pass, in place in the clients' rows); a BatchNorm's ``num_batches_tracked`` is
    the global value plus the client's steps; other buffers and frozen parameters are
    shared by all clients and never change. Not thread-safe: give each thread its own
    :meth:`replica`.

    Attributes:
        names: The trainable parameters' state-dict names, in order.
        dim: Elements in one client's flat state.
        has_batch_stats: Whether a layer normalises with batch statistics (BatchNorm):
            then a step must not mix batches of different sizes (no padding).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        conv: ConvMode = "auto",
        device: str | torch.device = "cpu",
        loss_fn: LossFn | None = None,
    ) -> None:
        """Prepare ``model`` (it is copied, not modified).

        Args:
            model: The architecture (in training mode while clients train).
            conv: How per-client convolutions run; see :data:`ConvMode`.
            device: Where the stacked tensors live.
            loss_fn: Per-sample loss; cross-entropy by default.

        Raises:
            ConfigError: For an unsupported layer (:func:`check_vectorizable`), an
                unknown ``conv`` mode, or an integer state entry other than a BatchNorm's
                ``num_batches_tracked``.
        """
        check_vectorizable(model)
        if conv not in ("auto", "loop", "grouped"):
            raise ConfigError(f"conv must be 'auto', 'loop' or 'grouped', got {conv!r}")
        self.device = torch.device(device)
        # ReLU after max pooling instead of before (bitwise the same, a quarter of the
        # elementwise work); the model is left as it is when it cannot be traced.
        module, _ = pool_before_relu(copy.deepcopy(model))
        self._module = module.to(self.device)
        self._module.train()
        use_loop = conv == "loop" or (conv == "auto" and self.device.type == "cpu")
        if use_loop:
            _swap_convs(self._module)
        # Same values and gradients as torch.nn.MaxPool2d, several times faster on CPU.
        use_fast_layers(self._module)
        _swap_linears(self._module)
        _swap_dropouts(self._module)
        self._loss_fn: LossFn = loss_fn or _per_sample_cross_entropy
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        stats, counts = set(), set()
        for name, sub in model.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                prefix = f"{name}." if name else ""
                stats |= {f"{prefix}running_mean", f"{prefix}running_var"}
                counts.add(f"{prefix}num_batches_tracked")
        entries: list[_Entry] = []
        offset = 0
        for name, tensor in model.state_dict().items():
            kind: Literal["param", "stat", "count", "fixed"] = "fixed"
            if name in trainable:
                kind = "param"
            elif name in stats:
                kind = "stat"
            elif name in counts:
                kind = "count"
            elif not tensor.is_floating_point():
                raise ConfigError(
                    f"state entry {name!r} is a {tensor.dtype} tensor; vectorized training "
                    "keeps every client's state as float32, so only BatchNorm's "
                    "num_batches_tracked may be an integer"
                )
            numel = tensor.numel()
            shape = tuple(int(s) for s in tensor.shape)
            entries.append(_Entry(name, shape, offset, numel, kind))
            offset += numel
        self._entries = tuple(entries)
        self.names: tuple[str, ...] = tuple(e.name for e in entries if e.trainable)
        self.dim = offset
        self.has_batch_stats = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self._module.modules()
        )
        self._dropout_calls: dict[tuple[int, ...], tuple[DropoutCall, ...]] = {}

    @property
    def module(self) -> nn.Module:
        """The prepared module (its parameters are replaced while a chunk trains)."""
        return self._module

    def replica(self) -> VectorizedModel:
        """Return a copy with its own module, for another thread.

        :func:`torch.func.functional_call` swaps the module's parameters while it runs, so
        two threads must not share one :class:`VectorizedModel`.

        Returns:
            The copy.
        """
        twin = copy.copy(self)
        twin._module = copy.deepcopy(self._module)
        return twin

    def stack(self, flat: torch.Tensor, num_clients: int) -> dict[str, torch.Tensor]:
        """Return ``num_clients`` copies of the trainable parameters of a flat state.

        Args:
            flat: One model's state (:func:`~emberfl.core.serialize_model`).
            num_clients: Copies.

        Returns:
            ``name -> (num_clients, *shape)`` contiguous tensors on the model's device.

        Raises:
            TensorMismatchError: If ``flat`` is not a 1-D tensor of :attr:`dim` elements.
        """
        if flat.dim() != 1 or flat.numel() != self.dim:
            raise TensorMismatchError(
                f"model_parameters has shape {tuple(flat.shape)}; this model's flat state "
                f"has {self.dim} elements (serialize_model of {type(self._module).__name__})"
            )
        flat = flat.detach().to(self.device, torch.float32)
        stacked: dict[str, torch.Tensor] = {}
        for e in self._entries:
            if e.trainable:
                one = flat[e.offset : e.offset + e.numel].view(e.shape)
                stacked[e.name] = (
                    one.unsqueeze(0)
                    .expand(num_clients, *e.shape)
                    .clone(memory_format=torch.contiguous_format)
                )
        return stacked

    def broadcast(self, flat: torch.Tensor, num_clients: int) -> dict[str, torch.Tensor]:
        """Return the trainable parameters of a flat state as ``num_clients`` expanded views.

        Nothing is copied (the client dimension has stride 0): the values every client
        starts a round from, read by the first step.

        Args:
            flat: One model's state, on :attr:`device`.
            num_clients: Clients.

        Returns:
            ``name -> (num_clients, *shape)`` read-only views of ``flat``.
        """
        return {
            e.name: flat[e.offset : e.offset + e.numel].view(e.shape).expand(num_clients, *e.shape)
            for e in self._entries
            if e.trainable
        }

    def row_views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the trainable parameters inside ``rows`` as stacked views (no copy).

        Args:
            rows: A ``(C, dim)`` tensor, e.g. consecutive arena slots.

        Returns:
            ``name -> (C, *shape)`` views: writing them writes ``rows``.
        """
        c = rows.shape[0]
        return {
            e.name: rows[:, e.offset : e.offset + e.numel].view(c, *e.shape)
            for e in self._entries
            if e.trainable
        }

    def load_shared(self, flat: torch.Tensor) -> None:
        """Load the entries all clients share (buffers, frozen parameters) from a flat state.

        Args:
            flat: One model's state (:func:`~emberfl.core.serialize_model`), e.g. the
                global model of the round.
        """
        state = self._module.state_dict()
        with torch.no_grad():
            for e in self._entries:
                if not e.trainable:
                    src = flat[e.offset : e.offset + e.numel].view(e.shape)
                    state[e.name].copy_(src)

    def grads(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """Return every client's gradient of its weighted loss on one stacked batch.

        Client ``c``'s loss is ``sum_j weights[c, j] * loss(model_c(inputs[c, j]),
        targets[c, j])``.

        Args:
            params: ``name -> (C, *shape)`` stacked parameters (not modified).
            inputs: ``(C, B, ...)`` inputs.
            targets: ``(C, B, ...)`` targets.
            weights: ``(C, B)`` per-sample loss weights (0 for padding).

        Returns:
            ``name -> (C, *shape)`` gradients; ``None`` for a parameter the forward pass
            does not use (like ``p.grad`` staying ``None``).
        """
        grads, _ = self.grads_and_losses(params, inputs, targets, weights)
        return grads

    def grads_and_losses(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        *,
        stats: Mapping[str, torch.Tensor] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        extra: Callable[[dict[str, torch.Tensor]], torch.Tensor | None] | None = None,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """Like :meth:`grads`, with per-client statistics, dropout masks and an extra term.

        Args:
            params: ``name -> (C, *shape)`` stacked parameters (not modified).
            inputs: ``(C, B, ...)`` inputs.
            targets: ``(C, B, ...)`` targets.
            weights: ``(C, B)`` per-sample loss weights (0 for padding).
            stats: ``name -> (C, *shape)`` BatchNorm running statistics, updated in place
                by the forward pass; they must be contiguous (an in-place update under
                vmap does not reach a strided view such as :meth:`stat_views`).
            masks: ``key -> (C, B, *shape)`` dropout masks (:meth:`dropout_calls`).
            extra: ``leaves -> scalar`` added to the summed loss (differentiated with it):
                the sum over clients of a per-client term, e.g. FedProx's proximal term.

        Returns:
            The gradients, and each client's weighted data loss ``(C,)`` (detached).
        """
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        side = {**(stats or {}), **(masks or {})}
        module = self._module

        def forward(
            p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor
        ) -> torch.Tensor:
            out: torch.Tensor = functional_call(module, {**p, **b}, (x,), strict=False)
            return out

        with torch.enable_grad():
            outputs = vmap(forward)(leaves, side, inputs)
            c, b = weights.shape
            losses = self._loss_fn(
                outputs.reshape(c * b, *outputs.shape[2:]), targets.flatten(0, 1)
            )
            per_client = (losses.reshape(c, b) * weights).sum(dim=1)
            total = per_client.sum()
            if extra is not None:
                term = extra(leaves)
                if term is not None:
                    total = total + term
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        return dict(zip(leaves, grads, strict=True)), per_client.detach()

    def per_sample_grads(
        self,
        params: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return every sample's own gradient, for every client of a stacked batch.

        Each of the ``C x B`` samples runs as a client of its own with a batch of one
        (the parameters repeated ``B`` times), so one vmapped forward and one backward
        pass give all per-sample gradients; memory grows with ``C x B x dim``. Models with
        batch statistics or dropout are not supported (their samples are not
        independent).

        Args:
            params: ``name -> (C, *shape)`` stacked parameters (not modified).
            inputs: ``(C, B, ...)`` inputs.
            targets: ``(C, B, ...)`` targets.
            weights: ``(C, B)`` the weights of :func:`stack_batches` (0 for padding).

        Returns:
            ``name -> (C, B, *shape)`` gradients of each sample's loss (zero for padding
            and for parameters the forward pass does not use), and each client's weighted
            loss ``(C,)`` (detached).
        """
        c, b = weights.shape
        leaves = {
            n: p.detach().repeat_interleave(b, dim=0).requires_grad_(True)
            for n, p in params.items()
        }
        module = self._module

        def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(module, p, (x,), strict=False)
            return out

        samples = inputs.reshape(c * b, 1, *inputs.shape[2:])
        with torch.enable_grad():
            outputs = vmap(forward)(leaves, samples)
            losses = self._loss_fn(
                outputs.reshape(c * b, *outputs.shape[2:]),
                targets.reshape(c * b, *targets.shape[2:]),
            )
            real = (weights > 0).reshape(-1).to(losses.dtype)
            grads = torch.autograd.grad(
                (losses * real).sum(), list(leaves.values()), allow_unused=True
            )
        out = {
            n: (torch.zeros_like(t) if g is None else g).view(c, b, *t.shape[1:])
            for (n, t), g in zip(leaves.items(), grads, strict=True)
        }
        per_client = (losses.detach().reshape(c, b) * weights).sum(dim=1)
        return out, per_client

    def stat_views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the BatchNorm running statistics inside ``rows`` as stacked views.

        Args:
            rows: A ``(C, dim)`` tensor.

        Returns:
            ``name -> (C, *shape)`` views (empty for a model without BatchNorm).
        """
        c = rows.shape[0]
        return {
            e.name: rows[:, e.offset : e.offset + e.numel].view(c, *e.shape)
            for e in self._entries
            if e.kind == "stat"
        }

    def dropout_calls(self, sample_shape: tuple[int, ...]) -> tuple[DropoutCall, ...]:
        """Return the dropout layers a forward pass of one sample runs, in order.

        Args:
            sample_shape: One input sample's shape.

        Returns:
            One :class:`DropoutCall` per layer (empty for a model without dropout).

        Raises:
            ConfigError: If a dropout layer runs more than once per forward pass.
        """
        cached = self._dropout_calls.get(sample_shape)
        if cached is not None:
            return cached
        layers = {m: n for n, m in self._module.named_modules() if isinstance(m, _StackedDropout)}
        calls: list[DropoutCall] = []
        if layers:
            handles = [
                m.register_forward_pre_hook(
                    lambda mod, args: calls.append(
                        DropoutCall(f"{layers[mod]}.mask", mod.p, tuple(args[0].shape[1:]))
                    )
                )
                for m in layers
            ]
            self._module.eval()
            try:
                with torch.no_grad():
                    self._module(torch.zeros((1, *sample_shape), device=self.device))
            finally:
                self._module.train()
                for h in handles:
                    h.remove()
            keys = [call.key for call in calls]
            if len(set(keys)) != len(keys):
                raise ConfigError(
                    "a Dropout layer runs more than once per forward pass, which vectorized "
                    "training does not support; give each use its own layer"
                )
        result = tuple(calls)
        self._dropout_calls[sample_shape] = result
        return result

    def init_rows(self, rows: torch.Tensor, global_flat: torch.Tensor) -> None:
        """Write every entry but the trainable parameters of the global model into ``rows``.

        Args:
            rows: A ``(C, dim)`` tensor (one row per client).
            global_flat: The flat global state.
        """
        c = rows.shape[0]
        with torch.no_grad():
            for e in self._entries:
                if not e.trainable:
                    src = global_flat[e.offset : e.offset + e.numel]
                    rows[:, e.offset : e.offset + e.numel].copy_(
                        src.unsqueeze(0).expand(c, e.numel)
                    )

    def finish_rows(
        self,
        rows: torch.Tensor,
        global_flat: torch.Tensor,
        steps: torch.Tensor,
        *,
        trained: bool,
    ) -> None:
        """Complete ``rows`` after training: step counts, and parameters never trained.

        Args:
            rows: The clients' rows (parameters and statistics as training left them).
            global_flat: The flat global state.
            steps: ``(C,)`` local steps per client.
            trained: Whether any step ran (if not, the parameters are the global ones).
        """
        c = rows.shape[0]
        with torch.no_grad():
            for e in self._entries:
                dst = rows[:, e.offset : e.offset + e.numel]
                src = global_flat[e.offset : e.offset + e.numel].unsqueeze(0).expand(c, e.numel)
                if e.kind == "count":
                    dst.copy_(src + steps.to(dst.dtype).view(c, 1))
                elif e.trainable and not trained:
                    dst.copy_(src)


# -- optimiser ------------------------------------------------------------------------------


class StackedSGD:
    """``torch.optim.SGD`` on stacked parameters, with per-client state and masking.

    The arithmetic is ``torch.optim.SGD``'s single-tensor path, element for element:
    ``d = g + wd * p``; with momentum ``buf = d`` on a client's first step, else
    ``buf = momentum * buf + (1 - dampening) * d``, and ``d = d + momentum * buf``
    (Nesterov) or ``d = buf``; then ``p = p - lr * d``. With ``momentum = 0`` and
    ``weight_decay = 0`` it is the serial FedAvg trainer's ``p.add_(grad, alpha=-lr)``.

    Attributes:
        lr: Learning rate.
        momentum: Momentum factor.
        dampening: Dampening for momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
    """

    def __init__(
        self,
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        """Create the optimiser.

        Args:
            lr: Learning rate (> 0).
            momentum: Momentum factor (>= 0).
            dampening: Dampening for momentum.
            weight_decay: L2 penalty (>= 0).
            nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).

        Raises:
            ConfigError: For a value out of range.
        """
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if momentum < 0:
            raise ConfigError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self._bufs: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the momentum buffers (a new set of clients starts)."""
        self._bufs = {}

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor | None],
        active: torch.Tensor | None,
        *,
        source: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Update ``params`` in place (or write ``source`` updated into ``params``).

        Inactive clients are left exactly as they were: their coefficients are zero (and
        their momentum factor one), so no temporary of the parameters' size is made.

        Args:
            params: ``name -> (C, *shape)`` stacked parameters (any strides, e.g. views
                of arena slots).
            grads: Their gradients; parameters with ``None`` are skipped (as
                ``torch.optim.SGD`` skips ``p.grad is None``).
            active: ``(C,)`` bool: clients to update (the others keep their parameters
                and momentum), or ``None`` for all.
            source: The current values, when they are not ``params`` itself (the first
                step reads the shared global model through stride-0 views and writes the
                clients' own parameters).
        """
        with torch.no_grad():
            for name, p in params.items():
                cur = p if source is None else source[name]
                g = grads.get(name)
                if g is None:
                    if cur is not p:
                        p.copy_(cur)
                    continue
                on = None
                if active is not None:
                    on = active.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
                d = g.add(cur, alpha=self.weight_decay) if self.weight_decay != 0 else g
                if self.momentum != 0:
                    buf = self._bufs.get(name)
                    if buf is None:
                        buf = d.clone()
                    elif on is None:
                        buf.mul_(self.momentum).add_(d, alpha=1 - self.dampening)
                    else:
                        buf.mul_(on * (self.momentum - 1) + 1)  # momentum, or 1 when off
                        buf.addcmul_(d, on * (1 - self.dampening))
                    self._bufs[name] = buf
                    d = d.add(buf, alpha=self.momentum) if self.nesterov else buf
                if on is None and cur is p:
                    p.add_(d, alpha=-self.lr)
                elif on is None:
                    torch.add(cur, d, alpha=-self.lr, out=p)
                elif cur is p:
                    p.addcmul_(d, on * -self.lr)
                else:
                    torch.addcmul(cur, d, on * -self.lr, out=p)


class StackedAdam:
    """``torch.optim.Adam`` on stacked parameters, with per-client state and masking.

    Unstacked (one client, no mask) the arithmetic is ``torch.optim.Adam``'s single-tensor
    path, operation for operation: ``g = g + wd * p``; ``m.lerp_(g, 1 - beta1)``;
    ``v = beta2 v + (1 - beta2) g^2``; ``p -= lr / (1 - beta1^t) * m / (sqrt(v) /
    sqrt(1 - beta2^t) + eps)``. Stacked with a mask, each client keeps its own step count
    ``t`` and inactive clients keep their parameters and moments.

    Attributes:
        lr: Learning rate.
        betas: ``(beta1, beta2)``.
        eps: The denominator's epsilon.
        weight_decay: L2 penalty (added to the gradient, as ``torch.optim.Adam`` does).
    """

    def __init__(
        self,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        """Create the optimiser.

        Args:
            lr: Learning rate (> 0).
            betas: Moment decays, each in ``[0, 1)``.
            eps: Epsilon (> 0).
            weight_decay: L2 penalty (>= 0).

        Raises:
            ConfigError: For a value out of range.
        """
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ConfigError(f"Adam's betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ConfigError(f"Adam's eps must be positive, got {eps}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.reset()

    def reset(self) -> None:
        """Forget the moments and step counts (a new set of clients starts)."""
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}
        self._t = 0
        self._counts: torch.Tensor | None = None  # per-client steps, once a mask appears

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor | None],
        active: torch.Tensor | None,
        *,
        source: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Update ``params`` in place (or write ``source`` updated into ``params``).

        Args:
            params: ``name -> (C, *shape)`` stacked parameters, or one client's.
            grads: Their gradients; parameters with ``None`` are skipped.
            active: ``(C,)`` bool: clients to update, or ``None`` for all.
            source: The current values, when they are not ``params`` itself.
        """
        beta1, beta2 = self.betas
        with torch.no_grad():
            if active is None and self._counts is None:
                self._t += 1
                counts = None
            else:
                if self._counts is None:
                    size = next(iter(params.values())).shape[0]
                    self._counts = torch.full((size,), float(self._t), dtype=torch.float64)
                step = torch.ones_like(self._counts) if active is None else active.double()
                self._counts += step.to(self._counts.device)
                counts = self._counts
            for name, p in params.items():
                cur = p if source is None else source[name]
                g = grads.get(name)
                if g is None:
                    if cur is not p:
                        p.copy_(cur)
                    continue
                if self.weight_decay != 0:
                    g = g.add(cur, alpha=self.weight_decay)
                m = self._m.get(name)
                v = self._v.get(name)
                if m is None or v is None:
                    m = self._m[name] = torch.zeros_like(g)
                    v = self._v[name] = torch.zeros_like(g)
                if counts is None:
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    step_size = self.lr / (1 - beta1**self._t)
                    denom = (v.sqrt() / math.sqrt(1 - beta2**self._t)).add_(self.eps)
                    if cur is p:
                        p.addcdiv_(m, denom, value=-step_size)
                    else:
                        torch.addcdiv(cur, m, denom, value=-step_size, out=p)
                    continue
                shape = (-1, *([1] * (p.dim() - 1)))
                on = (
                    torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
                    if active is None
                    else active.to(p.dtype)
                ).view(shape)
                m.add_((g - m) * (on * (1 - beta1)))
                v.mul_(1 - on * (1 - beta2)).addcmul_(g, g * on, value=1 - beta2)
                t = counts.clamp(min=1).to(p.device)
                bc1 = (1 - beta1**t).to(p.dtype).view(shape)
                bc2 = (1 - beta2**t).to(p.dtype).view(shape)
                update = m / (v.sqrt() / bc2.sqrt() + self.eps) * (on * self.lr / bc1)
                torch.sub(cur, update, out=p)


# -- batches ------------------------------------------------------------------------------


def stack_batches(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad and stack one step's mini-batches of ``C`` clients.

    Args:
        batches: ``(inputs, targets)`` per client, or ``None`` for a client with no batch
            at this step (it has run out of local steps). At least one is not ``None``.
        device: Where the result goes.

    Returns:
        ``(inputs (C, B, ...), targets (C, B, ...), weights (C, B), active (C,))`` where
        ``B`` is the largest batch, padding is zero, ``weights[c, j] = 1 / n_c`` for the
        ``n_c`` real samples of client ``c`` and 0 elsewhere, and ``active[c]`` says
        whether client ``c`` had a non-empty batch.

    Raises:
        TensorMismatchError: If the clients' samples differ in shape or dtype.
    """
    present = [b for b in batches if b is not None and b[0].shape[0] > 0]
    if not present:
        raise ValueError("stack_batches needs at least one non-empty batch")
    x0, y0 = present[0]
    width = max(int(b[0].shape[0]) for b in present)
    c = len(batches)
    # ``empty`` + zeroing only the padding: most rows are full, and zero-filling a large
    # fresh buffer costs as much as filling it with the data.
    inputs = torch.empty((c, width, *x0.shape[1:]), dtype=x0.dtype, device=device)
    targets = torch.empty((c, width, *y0.shape[1:]), dtype=y0.dtype, device=device)
    weights = torch.zeros((c, width), dtype=torch.float32, device=device)
    active = torch.zeros(c, dtype=torch.bool, device=device)
    for i, batch in enumerate(batches):
        if batch is None or batch[0].shape[0] == 0:
            inputs[i].zero_()
            targets[i].zero_()
            continue
        x, y = batch
        n = int(x.shape[0])
        if n < width:
            inputs[i, n:].zero_()
            targets[i, n:].zero_()
        if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype or y.shape[1:] != y0.shape[1:]:
            raise TensorMismatchError(
                f"client {i} of the chunk has samples of shape {tuple(x.shape[1:])} "
                f"({x.dtype}), the first client {tuple(x0.shape[1:])} ({x0.dtype}); "
                "vectorized training needs one sample shape"
            )
        inputs[i, :n].copy_(x)
        targets[i, :n].copy_(y)
        weights[i, :n] = 1.0 / n
        active[i] = True
    return inputs, targets, weights, active
