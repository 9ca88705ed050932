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

import logging
import math
from typing import Any

import torch

from emberfl._checks import check_real
from emberfl.aggregation import kernels
from emberfl.aggregation.aggregators import Aggregator, UpdateSet
from emberfl.errors import ConfigError, InvalidArgumentError
from emberfl.rng import Purpose, stream

__all__ = ["DPMean", "epsilon"]


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
    dpa = _accounting()
    from dp_accounting import rdp

    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier)), rounds
    )
    # The accountant logs a warning for each RDP order whose series does not converge and
    # is left out of the minimum (it stays a valid bound); keep the CLI's output clean.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = rdp.RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)
