"""Byzantine-robust rules over a round's updates: Krum, Multi-Krum, Bulyan, the geometric
median and the norm-bounded mean.

Each rule needs every update of the round at once (``needs_all_updates``: the simulation
keeps them in an :class:`~emberfl.aggregation.UpdateSet`, not in a streaming sum) and
does its heavy work in emberfl's Rust kernels: pairwise distances, distances to a point,
norms, weighted means and the coordinate-wise trimmed mean, each parallel and bitwise
independent of the thread count. Selections break ties by the lower position in the
round's client list, so a rule's choice never depends on scheduling.

``m`` below is the number of updates in the round and ``f`` the number of Byzantine
clients a rule is asked to tolerate.

* :class:`Krum` (Blanchard et al., 2017): the update whose ``m - f - 2`` nearest
  neighbours are closest (smallest sum of squared distances); needs ``m >= 2f + 3``.
* :class:`MultiKrum`: the mean of the ``k`` updates with the best Krum scores.
* :class:`Bulyan` (El Mhamdi et al., 2018): Krum picks ``theta = m - 2f`` updates one at a
  time (each pick leaves the pool), then a coordinate-wise trimmed mean drops the ``f``
  largest and ``f`` smallest values of each coordinate; needs ``m >= 4f + 3``.
* :class:`GeometricMedian` (RFA, Pillutla et al., 2022): smoothed Weiszfeld iterations
  for ``argmin_v sum_k a_k ||v - x_k||`` with the updates' weights ``a_k``.
* :class:`ClippedMean`: each update scaled to L2 norm at most ``C``, then the weighted
  mean (a norm-bounded mean).

Krum, Multi-Krum and Bulyan treat every update alike (their papers' rules); the
geometric median and the clipped mean use the updates' weights (samples, for FedAvg).
"""

from __future__ import annotations

import math

import torch

from emberfl._checks import check_int, check_real
from emberfl.aggregation import kernels
from emberfl.aggregation.aggregators import Aggregator, UpdateSet
from emberfl.errors import InvalidArgumentError

__all__ = [
    "Bulyan",
    "ClippedMean",
    "GeometricMedian",
    "Krum",
    "MultiKrum",
    "krum_scores",
]


def krum_scores(dists: torch.Tensor, f: int) -> torch.Tensor:
    """Return each update's Krum score: the sum of its ``m - f - 2`` smallest squared
    distances to the other updates (0 when that is no neighbour).

    Args:
        dists: The ``(m, m)`` float64 squared distances (zero diagonal).
        f: The Byzantine clients tolerated.

    Returns:
        A ``(m,)`` float64 tensor.
    """
    m = int(dists.shape[0])
    k = max(m - f - 2, 0)
    if k == 0 or m == 1:
        return torch.zeros(m, dtype=torch.float64)
    # Drop the diagonal (each update's zero distance to itself), then sum the k smallest.
    others = dists.masked_select(~torch.eye(m, dtype=torch.bool)).view(m, m - 1)
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def _ranked(scores: torch.Tensor) -> list[int]:
    """Positions by increasing score, ties by position (a stable sort)."""
    return [int(i) for i in torch.sort(scores, stable=True).indices]


class _Tolerant(Aggregator):
    """A rule that tolerates ``f`` Byzantine updates out of ``m >= factor * f + 3``.

    Attributes:
        f: Byzantine clients tolerated.
    """

    factor = 2

    def __init__(self, f: int = 1) -> None:
        """Create the rule.

        Args:
            f: Byzantine clients tolerated (>= 0).

        Raises:
            InvalidArgumentError: ``f`` is not an integer >= 0.
        """
        self.f = check_int(f, "f (Byzantine clients tolerated)", low=0)

    def distances(self, updates: UpdateSet, *, num_threads: int | None) -> torch.Tensor | None:
        """Return the round's pairwise squared distances, or ``None`` for a single update
        with ``f = 0`` (its own aggregate).

        Raises:
            InvalidArgumentError: Fewer than ``factor * f + 3`` updates.
        """
        m = updates.count
        if m == 1 and self.f == 0:
            return None
        if m < self.factor * self.f + 3:
            raise InvalidArgumentError(
                f"{self.name} with f={self.f} needs at least {self.factor}f + 3 = "
                f"{self.factor * self.f + 3} updates in a round, got {m}; sample more clients "
                "per round or lower f"
            )
        return kernels.pairwise_sq_dists(updates.arena, range(m), num_threads=num_threads)


class Krum(_Tolerant):
    """Krum: the single update closest to its ``m - f - 2`` nearest neighbours.

    Attributes:
        f: Byzantine clients tolerated.
    """

    name = "krum"

    def select(self, updates: UpdateSet, *, num_threads: int | None) -> list[int]:
        """Return the positions Krum keeps (one)."""
        dists = self.distances(updates, num_threads=num_threads)
        if dists is None:
            return [0]
        return _ranked(krum_scores(dists, self.f))[:1]

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the update Krum selects into ``out``."""
        (chosen,) = self.select(updates, num_threads=num_threads)
        out.copy_(updates.arena.slot(chosen))


class MultiKrum(Krum):
    """Multi-Krum: the plain mean of the ``k`` updates with the best Krum scores.

    Attributes:
        f: Byzantine clients tolerated.
        k: Updates averaged (``None``: ``m - f``).
    """

    name = "multi-krum"

    def __init__(self, f: int = 1, k: int | None = None) -> None:
        """Create the rule.

        Args:
            f: Byzantine clients tolerated (>= 0).
            k: Updates averaged (``None``: ``m - f``, Blanchard et al.'s choice).

        Raises:
            InvalidArgumentError: ``f`` or ``k`` out of range.
        """
        super().__init__(f)
        self.k = None if k is None else check_int(k, "k (updates averaged)", low=1)

    def select(self, updates: UpdateSet, *, num_threads: int | None) -> list[int]:
        """Return the positions Multi-Krum averages, best score first."""
        m = updates.count
        k = self.k if self.k is not None else m - self.f
        if not 1 <= k <= m:
            raise InvalidArgumentError(f"multi-krum averages k={k} of {m} updates: need 1..{m}")
        dists = self.distances(updates, num_threads=num_threads)
        if dists is None:
            return [0]
        return _ranked(krum_scores(dists, self.f))[:k]

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the mean of the selected updates into ``out``."""
        chosen = sorted(self.select(updates, num_threads=num_threads))
        kernels.weighted_mean(
            updates.arena, chosen, [1.0] * len(chosen), out, num_threads=num_threads
        )


class Bulyan(_Tolerant):
    """Bulyan: ``theta = m - 2f`` updates picked by Krum one at a time, then the
    coordinate-wise mean of their middle ``theta - 2f`` values.

    Attributes:
        f: Byzantine clients tolerated.
    """

    name = "bulyan"
    factor = 4

    def select(self, updates: UpdateSet, *, num_threads: int | None) -> list[int]:
        """Return the ``theta`` positions Bulyan's Krum stage picks, in picking order."""
        m = updates.count
        dists = self.distances(updates, num_threads=num_threads)
        if dists is None:
            return [0]
        pool = list(range(m))
        picked: list[int] = []
        for _ in range(m - 2 * self.f):
            sub = dists[pool][:, pool]
            best = _ranked(krum_scores(sub, self.f))[0]
            picked.append(pool.pop(best))
        return picked

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write Bulyan's update into ``out``."""
        chosen = sorted(self.select(updates, num_threads=num_threads))
        theta = len(chosen)
        # floor(beta * theta) = f exactly: beta sits half an update above f / theta, and
        # below 1/2 because theta >= 2f + 3.
        beta = (self.f + 0.5) / theta if self.f else 0.0
        kernels.trimmed_mean(updates.arena, chosen, out, beta, num_threads=num_threads)


class GeometricMedian(Aggregator):
    """The weighted geometric median by smoothed Weiszfeld iterations (RFA).

    Starting from the weighted mean, each iteration sets
    ``v <- sum_k b_k x_k / sum_k b_k`` with ``b_k = a_k / max(nu, ||v - x_k||)``, and stops
    after ``max_iterations`` or when the objective ``sum_k a_k ||v - x_k||`` improves by
    less than ``tolerance`` times itself.

    Attributes:
        max_iterations: Weiszfeld iterations at most.
        nu: Smoothing: distances below it count as ``nu``.
        tolerance: Relative improvement of the objective below which the iterations stop.
        last_iterations: Iterations the last :meth:`combine` ran.
    """

    name = "geometric-median"

    def __init__(self, max_iterations: int = 10, nu: float = 1e-6, tolerance: float = 1e-6) -> None:
        """Create the rule.

        Args:
            max_iterations: Weiszfeld iterations at most (>= 1).
            nu: Smoothing (> 0).
            tolerance: Relative improvement that stops the iterations (>= 0).

        Raises:
            InvalidArgumentError: A value out of range.
        """
        self.max_iterations = check_int(max_iterations, "max_iterations", low=1)
        self.nu = check_real(nu, "nu", finite=True, low=0.0)
        if self.nu == 0:
            raise InvalidArgumentError("nu must be > 0 (it keeps the weights finite)")
        self.tolerance = check_real(tolerance, "tolerance", finite=True, low=0.0)
        self.last_iterations = 0

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the geometric median of ``updates`` into ``out``."""
        slots = list(range(updates.count))
        alpha = torch.tensor(updates.weights, dtype=torch.float64)
        if not float(alpha.sum()) > 0:
            raise InvalidArgumentError("the geometric median needs a positive total weight")
        alpha = alpha / alpha.sum()
        kernels.weighted_mean(updates.arena, slots, alpha.tolist(), out, num_threads=num_threads)
        self.last_iterations = 0
        if len(slots) == 1:
            return
        dist = kernels.sq_dists_to(updates.arena, slots, out, num_threads=num_threads).sqrt()
        objective = float((alpha * dist).sum())
        for _ in range(self.max_iterations):
            b = alpha / dist.clamp(min=self.nu)
            candidate = torch.empty_like(out)
            kernels.weighted_mean(
                updates.arena, slots, b.tolist(), candidate, num_threads=num_threads
            )
            new_dist = kernels.sq_dists_to(
                updates.arena, slots, candidate, num_threads=num_threads
            ).sqrt()
            new_objective = float((alpha * new_dist).sum())
            self.last_iterations += 1
            if new_objective > objective:  # float32 rounding at the optimum: keep the best
                break
            out.copy_(candidate)
            improvement = objective - new_objective
            dist, objective = new_dist, new_objective
            if improvement <= self.tolerance * objective:
                break


class ClippedMean(Aggregator):
    """The weighted mean of the updates, each first scaled to L2 norm at most ``C``:
    ``sum_k w_k min(1, C / ||x_k||) x_k / sum_k w_k``.

    Attributes:
        clip_norm: ``C``.
    """

    name = "clipped-mean"

    def __init__(self, clip_norm: float) -> None:
        """Create the rule.

        Args:
            clip_norm: The largest L2 norm an update keeps (> 0; ``math.inf``: the mean).

        Raises:
            InvalidArgumentError: ``clip_norm`` is not a positive number.
        """
        self.clip_norm = check_real(clip_norm, "clip_norm", low=0.0)
        if self.clip_norm == 0:
            raise InvalidArgumentError("clip_norm must be > 0")

    def scales(self, updates: UpdateSet, *, num_threads: int | None) -> list[float]:
        """Return each update's scale ``min(1, C / ||x_k||)``."""
        norms = kernels.norms(updates.arena, range(updates.count), num_threads=num_threads)
        return [1.0 if n <= self.clip_norm else self.clip_norm / n for n in norms.tolist()]

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the norm-bounded mean into ``out``."""
        scales = self.scales(updates, num_threads=num_threads)
        weights = [w * s for w, s in zip(updates.weights, scales, strict=True)]
        kernels.weighted_mean(
            updates.arena, range(updates.count), weights, out, num_threads=num_threads
        )
        # The kernel divides by sum(w_k s_k); the clipped mean divides by sum(w_k).
        factor = math.fsum(weights) / math.fsum(updates.weights)
        if factor != 1.0:
            out.mul_(factor)
