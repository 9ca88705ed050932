"""Client-level differential privacy: DP-FedAvg's Gaussian mechanism and its accounting.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
Models"): each round samples every client independently with probability ``q``
(Poisson sampling, ``selection="poisson"``), clips each sampled client's update to L2
norm ``C``, sums the clipped updates, adds Gaussian noise ``N(0, (sigma C)^2 I)`` and
divides by the *expected* number of clients ``q N`` (a fixed denominator, so one client's
presence changes the sum by at most ``C`` and nothing else):

    Delta = (sum_k min(1, C / ||Delta_k||) Delta_k + N(0, sigma^2 C^2 I)) / (q N)

The noise comes from the stream ``(seed, DP_NOISE, round)``, drawn on the server, so it
does not depend on the mode or the parallelism, and a resumed run draws the same.

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping"): with a target quantile ``gamma``, the bound follows the ``gamma`` quantile of
the update norms. Each round the server also counts the updates that were not clipped,
privately: ``b = (#{k: ||Delta_k|| <= C} + N(0, sigma_b^2)) / (q N)`` with ``sigma_b =
q N / 20`` (noise from the stream ``(seed, DP_NOISE, client 1, round)``), and sets
``C <- C exp(-eta_C (b - gamma))`` (``eta_C = 0.2``) for the next round. The two
releases together are one Gaussian mechanism of multiplier ``sigma``: the update's noise
multiplier is ``(sigma^-2 - (2 sigma_b)^-2)^(-1/2)``, so the accounting is unchanged.

The privacy spent is computed by Google's ``dp-accounting`` library (its RDP accountant:
``rounds`` compositions of the Poisson-subsampled Gaussian mechanism with noise
multiplier ``sigma`` and rate ``q``, under add-or-remove-one-client adjacency), never by
a formula of emberfl's own: :func:`epsilon`. Install it with ``pip install
"emberfl[dp]"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from emberfl._checks import check_real
from emberfl.aggregation import kernels
from emberfl.aggregation.aggregators import Aggregator, UpdateSet
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.rng import Purpose, stream

__all__ = [
    "DPSGD",
    "MAX_NOISE_MULTIPLIER",
    "DPMean",
    "epsilon",
    "local_epsilon",
    "noise_for_epsilon",
]


class DPMean(Aggregator):
    """DP-FedAvg's noisy clipped sum over a fixed denominator (see the module docstring).

    Attributes:
        noise_multiplier: ``sigma``.
        clip_norm: ``C``.
        expected_clients: The denominator ``q N``.
        seed: The experiment seed (the noise's stream).
        round: The round being aggregated (set by the simulation before :meth:`combine`).
        last_clipped: Updates the last :meth:`combine` clipped.
        target_quantile: Adaptive clipping's ``gamma`` (``None``: a fixed bound).
        clip_lr: Adaptive clipping's ``eta_C``.
        count_std: The noise ``sigma_b`` of the unclipped count.
    """

    name = "dp-mean"
    handles_empty = True

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        seed: int,
        target_quantile: float | None = None,
        clip_lr: float = 0.2,
        count_std: float | None = None,
    ) -> None:
        """Create the mechanism.

        Args:
            noise_multiplier: ``sigma`` (>= 0; 0 adds no noise and gives no privacy).
            clip_norm: ``C``, the initial one with adaptive clipping (> 0; ``math.inf``: no
                clipping, only with ``sigma = 0`` and a fixed bound).
            expected_clients: ``q N`` (> 0).
            seed: The experiment seed.
            target_quantile: Adaptive clipping's target quantile ``gamma`` in ``(0, 1)``
                (``None``: the bound stays ``clip_norm``).
            clip_lr: Adaptive clipping's step ``eta_C`` (> 0).
            count_std: The count's noise ``sigma_b`` (``None``: ``expected_clients / 20``);
                it must exceed ``sigma / 2``.

        Raises:
            InvalidArgumentError: A value out of range.
        """
        self.noise_multiplier = check_real(noise_multiplier, "noise_multiplier", low=0.0)
        if not math.isfinite(self.noise_multiplier):
            raise InvalidArgumentError("noise_multiplier must be finite")
        self.clip_norm = check_real(clip_norm, "clip_norm", low=0.0)
        if self.clip_norm == 0:
            raise InvalidArgumentError("clip_norm must be > 0")
        if math.isinf(self.clip_norm) and self.noise_multiplier > 0:
            raise InvalidArgumentError(
                "an infinite clip_norm has no finite sensitivity: the noise sigma * C would be "
                "infinite; bound the updates or set noise_multiplier to 0"
            )
        self.expected_clients = check_real(expected_clients, "expected_clients", low=0.0)
        if self.expected_clients == 0:
            raise InvalidArgumentError("expected_clients must be > 0")
        self.seed = seed
        self.round = 0
        self.last_clipped = 0
        self.target_quantile = target_quantile
        self.clip_lr = check_real(clip_lr, "clip_lr", finite=True, low=0.0)
        self.count_std = self.expected_clients / 20 if count_std is None else float(count_std)
        self.update_noise_multiplier = self.noise_multiplier
        if target_quantile is not None:
            if not (math.isfinite(target_quantile) and 0 < target_quantile < 1):
                raise InvalidArgumentError(
                    f"the target quantile must be in (0, 1), got {target_quantile}"
                )
            if math.isinf(self.clip_norm):
                raise InvalidArgumentError("adaptive clipping needs a finite initial clip_norm")
            if self.noise_multiplier > 0:
                if not self.count_std > self.noise_multiplier / 2:
                    raise InvalidArgumentError(
                        f"adaptive clipping's count noise {self.count_std:g} (expected clients "
                        f"/ 20) must exceed noise_multiplier / 2 = {self.noise_multiplier / 2:g}; "
                        "sample more clients per round or lower the noise multiplier"
                    )
                self.update_noise_multiplier = (
                    self.noise_multiplier**-2 - (2 * self.count_std) ** -2
                ) ** -0.5

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return the adaptive bound, to be checkpointed (empty for a fixed bound)."""
        if self.target_quantile is None:
            return {}
        return {"clip_norm": torch.tensor([self.clip_norm], dtype=torch.float64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors`."""
        if self.target_quantile is not None:
            self.clip_norm = float(tensors["clip_norm"][0])

    def begin_round(self, seed: int, round: int) -> None:
        """Note the round, whose stream the noise comes from."""
        self.seed, self.round = seed, round

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the privatised mean update into ``out``."""
        m = updates.count
        out.zero_()
        self.last_clipped = 0
        if m:
            slots = range(m)
            norms = kernels.norms(updates.arena, slots, num_threads=num_threads).tolist()
            scales = [1.0 if n <= self.clip_norm else self.clip_norm / n for n in norms]
            self.last_clipped = sum(s < 1.0 for s in scales)
            unclipped = m - self.last_clipped
            kernels.weighted_mean(updates.arena, slots, scales, out, num_threads=num_threads)
            # The kernel divides by sum(scales); DP-FedAvg divides by q N.
            factor = math.fsum(scales) / self.expected_clients
            if factor != 1.0:
                out.mul_(factor)
        else:
            unclipped = 0
        if self.noise_multiplier > 0:
            draw = stream(self.seed, purpose=Purpose.DP_NOISE, round=self.round)
            noise = torch.from_numpy(draw.normal(out.numel()))
            std = self.update_noise_multiplier * self.clip_norm / self.expected_clients
            out.add_((noise * std).to(torch.float32))
        if self.target_quantile is not None:
            count = float(unclipped)
            if self.noise_multiplier > 0:
                count_draw = stream(self.seed, purpose=Purpose.DP_NOISE, client=1, round=self.round)
                count += float(count_draw.normal(1)[0]) * self.count_std
            fraction = count / self.expected_clients
            self.clip_norm *= math.exp(-self.clip_lr * (fraction - self.target_quantile))


def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(
            'differential privacy needs the dp-accounting library: pip install "emberfl[dp]"'
        ) from None
    return dp_accounting


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Return the ``epsilon`` DP-FedAvg has spent after ``rounds`` rounds at ``delta``.

    Computed by ``dp-accounting``'s RDP accountant for ``rounds`` self-compositions of the
    Poisson-subsampled Gaussian mechanism (add-or-remove-one-client adjacency).

    Args:
        noise_multiplier: ``sigma`` (> 0).
        sample_rate: ``q`` in ``(0, 1]``.
        rounds: Rounds run (>= 0; 0 spends nothing).
        delta: ``delta`` in ``(0, 1)``.

    Returns:
        ``epsilon`` (``math.inf`` without noise).

    Raises:
        ConfigError: A value out of range, or ``dp-accounting`` missing.
    """
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigError(f"dp_delta must be in (0, 1), got {delta}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ConfigError(f"the sampling rate must be in (0, 1], got {sample_rate}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    # The accountant composes T rounds as T times one round's RDP curve, and computing
    # that curve is the expensive part (about 0.1 s): it is computed once per (sigma, q)
    # and scaled here, which gives the accountant's own answer bit for bit.
    orders, step = _step_rdp(float(noise_multiplier), float(sample_rate))
    with _quiet_accountant():
        eps, _ = rdp.compute_epsilon(orders, rounds * step, delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> tuple[Any, Any]:
    """One Poisson-subsampled Gaussian step's RDP curve: ``(orders, rdp)``, by the
    accountant itself."""
    dpa = _accounting()
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    with _quiet_accountant():
        accountant.compose(
            dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
        )
    return accountant._orders, accountant._rdp


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """The accountant logs a warning for each RDP order whose series does not converge and
    is left out of the minimum (it stays a valid bound); keep the CLI's output clean."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


MAX_NOISE_MULTIPLIER = 1000.0
"""The largest noise multiplier :func:`noise_for_epsilon` offers (beyond it the noise
drowns any update: the target is unreachable in practice)."""


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Return the smallest noise multiplier whose ``epsilon`` after ``rounds`` is ``target``.

    The inverse of :func:`epsilon`, found by ``dp-accounting``'s
    ``calibrate_dp_mechanism`` (Brent's method over the RDP accountant; tolerance 1e-4 in
    ``sigma``, on the private side).

    Args:
        target: The ``epsilon`` to spend (> 0).
        sample_rate: ``q`` in ``(0, 1]``.
        rounds: Rounds (>= 1).
        delta: ``delta`` in ``(0, 1)``.

    Returns:
        ``sigma`` with ``epsilon(sigma, q, rounds, delta) <= target``.

    Raises:
        ConfigError: A value out of range, or a target that needs more noise than
            :data:`MAX_NOISE_MULTIPLIER`.
    """
    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"dp_target_epsilon must be a positive number, got {target}")
    if rounds < 1:
        raise ConfigError(f"the rounds to calibrate for must be >= 1, got {rounds}")
    epsilon(1.0, sample_rate, 1, delta)  # checks q and delta, and the library
    if epsilon(MAX_NOISE_MULTIPLIER, sample_rate, rounds, delta) > target:
        raise ConfigError(
            f"epsilon {target} at delta {delta:g} after {rounds} rounds at sampling rate "
            f"{sample_rate:.3g} is unreachable: it needs a noise multiplier above "
            f"{MAX_NOISE_MULTIPLIER:g}; raise the target or delta, or run fewer rounds"
        )
    dpa = _accounting()
    from dp_accounting import rdp

    def event(sigma: float) -> Any:
        inner = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(sigma))
        return dpa.SelfComposedDpEvent(inner, rounds)

    with _quiet_accountant():
        sigma = dpa.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            event,
            target,
            delta,
            dpa.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
            tol=1e-4,
        )
    sigma = float(sigma)
    while epsilon(sigma, sample_rate, rounds, delta) > target:  # stay on the private side
        sigma += 1e-4
    return sigma


# --------------------------------------------------------------------------------------
# Local DP-SGD
# --------------------------------------------------------------------------------------


class DPSGD:
    """Record-level DP-SGD on each client (Abadi et al., 2016, "Deep Learning with
    Differential Privacy").

    Every local step computes one gradient per sample (:func:`torch.func.vmap` of
    :func:`torch.func.grad`), clips each to L2 norm ``C`` over all trainable parameters,
    sums them, adds ``N(0, (sigma C)^2 I)`` and divides by the batch size:

        g = (sum_i min(1, C / ||g_i||) g_i + N(0, sigma^2 C^2 I)) / B

    A term of the algorithm that does not depend on the data (FedProx's proximal term) is
    added after the noise; the algorithm's gradient hook (SCAFFOLD's correction) sees the
    private gradient. The noise of client ``k`` in round ``t`` comes from the stream
    ``(seed, DP_SGD_NOISE, k, t)``, drawn on the CPU in parameter order, so it does not depend
    on the mode, the parallelism or the device.

    Each step's batch is a fixed-size slice of the client's shuffled data;
    :func:`local_epsilon` accounts it as Poisson sampling at rate ``B / n_k``, the usual
    approximation of DP-SGD libraries. Models with BatchNorm (a statistic mixes samples)
    or dropout are refused.

    Attributes:
        noise_multiplier: ``sigma`` (>= 0).
        clip_norm: ``C`` (> 0).
    """

    def __init__(self, noise_multiplier: float, clip_norm: float) -> None:
        """Set the mechanism.

        Args:
            noise_multiplier: ``sigma`` (>= 0; 0: clipping only).
            clip_norm: ``C`` (> 0; ``math.inf``: no clipping).

        Raises:
            ConfigError: A value out of range.
        """
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(f"dp_noise_multiplier must be >= 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ConfigError(f"dp_clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier > 0 and not math.isfinite(clip_norm):
            raise ConfigError(
                "the noise is dp_noise_multiplier x dp_clip_norm: noise needs a finite dp_clip_norm"
            )
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)

    def __repr__(self) -> str:
        """Return ``DPSGD(sigma=..., C=...)``."""
        return f"DPSGD(sigma={self.noise_multiplier}, C={self.clip_norm})"

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model whose per-sample gradients are not defined.

        Raises:
            ConfigError: For BatchNorm or dropout layers.
        """
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                raise ConfigError(
                    f"local DP-SGD needs per-sample gradients, but {name} is a BatchNorm "
                    "layer (its statistics mix the samples of a batch); use a model without "
                    "BatchNorm (GroupNorm works)"
                )
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                raise ConfigError(
                    f"local DP-SGD does not support dropout ({name}); use a model without it"
                )

    def noise_generator(self, seed: int, cid: int, round_: int) -> torch.Generator:
        """Return client ``cid``'s noise generator for round ``round_``."""
        draw = stream(seed, purpose=Purpose.DP_SGD_NOISE, client=cid, round=round_)
        return torch.Generator().manual_seed(draw.torch_seed())

    def gradients(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        data: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the private gradient of one batch and the batch's mean loss.

        Args:
            model: The client's model (its buffers and frozen parameters are used as
                they are).
            params: Its trainable parameters, by name.
            data: The batch's inputs, ``(B, ...)``.
            target: Its labels, ``(B,)``.
            generator: The client's noise generator (advanced by one draw per element).

        Returns:
            ``(gradients by name, mean loss)``.
        """
        from torch.func import functional_call, grad_and_value, vmap

        fixed = {n: t.detach() for n, t in model.named_parameters() if n not in params}
        fixed |= {n: t for n, t in model.named_buffers()}
        live = {n: p.detach() for n, p in params.items()}

        def sample_loss(
            p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(model, {**p, **fixed}, (x.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

        per_sample, losses = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0))(
            live, data, target
        )
        batch = data.shape[0]
        sq = torch.zeros(batch, dtype=torch.float32, device=data.device)
        for g in per_sample.values():
            sq += g.reshape(batch, -1).pow(2).sum(dim=1)
        # Opacus's factor: min(1, C / (||g_i|| + 1e-6)).
        factor = (self.clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        out: dict[str, torch.Tensor] = {}
        for name, g in per_sample.items():
            total = torch.tensordot(factor, g, dims=1)
            if self.noise_multiplier > 0:
                noise = torch.randn(total.shape, generator=generator, dtype=torch.float32)
                total = total + (self.noise_multiplier * self.clip_norm) * noise.to(total.device)
            out[name] = total / batch
        return out, losses.mean()


def local_epsilon(noise_multiplier: float, clients: list[tuple[float, int]], delta: float) -> float:
    """Return the record-level ``epsilon`` of local DP-SGD for its worst-off client.

    Client ``k`` has taken ``T_k`` steps with batches that are a fraction ``q_k = B /
    n_k`` of its data; its ``epsilon`` is ``dp-accounting``'s RDP bound for ``T_k``
    compositions of the Poisson-subsampled Gaussian mechanism at ``q_k`` (:func:`epsilon`),
    and the largest over the clients is returned.

    Args:
        noise_multiplier: ``sigma``.
        clients: ``(q_k, T_k)`` per client (clients with ``T_k = 0`` spend nothing).
        delta: ``delta`` in ``(0, 1)``.

    Returns:
        The largest ``epsilon`` (0 before any step; ``math.inf`` without noise).
    """
    seen: dict[tuple[float, int], float] = {}
    worst = 0.0
    for rate, steps in clients:
        if steps <= 0:
            continue
        key = (min(1.0, rate), int(steps))
        if key not in seen:
            seen[key] = epsilon(noise_multiplier, key[0], key[1], delta)
        worst = max(worst, seen[key])
    return worst
