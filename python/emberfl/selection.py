"""Client selection: which clients train in a round.

Three rules, each a pure function of the experiment seed and the round (and, for
power-of-choice, of the global model), so a resumed run selects the same clients:

* ``uniform``: ``m`` distinct clients, every client equally likely (McMahan et al., 2017);
* ``size``: ``m`` distinct clients drawn without replacement with probability
  proportional to their number of training samples ``n_k`` (the sampling scheme of Li et
  al., 2020, "Federated Optimization in Heterogeneous Networks"); weighted sampling
  without replacement by Efraimidis and Spirakis' keys ``log(u_k) / n_k``;
* ``power-of-choice`` (Cho et al., 2022, "Towards Understanding Biased Client Selection
  in Federated Learning"): ``d`` candidates drawn as ``size`` draws them, each evaluates
  the global model's loss on its training data, and the ``m`` with the highest loss train.
  Ties go to the lower client id;
* ``poisson``: every client independently with probability ``q = m / N``, so a round has
  ``m`` clients on average (the sampling that differential privacy's accounting assumes,
  McMahan et al., 2018); a round may have none.

Every rule returns the clients sorted. Under ``size`` and ``power-of-choice`` selection
the algorithm's own weighting still applies (FedAvg weights the selected clients by
``n_k``); the uniform rule is the one under which FedAvg's weighted mean is the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np

from emberfl.errors import ConfigError, NonFiniteError
from emberfl.rng import Purpose, stream

__all__ = [
    "SELECTIONS",
    "Selection",
    "power_of_choice",
    "select_by_size",
    "select_poisson",
    "select_uniform",
]

Selection = Literal["uniform", "size", "power-of-choice", "poisson"]
SELECTIONS: tuple[str, ...] = get_args(Selection)
"""The client-selection rules, by name (``emberfl run --client-selection``)."""


def _check(num_clients: int, count: int) -> None:
    if not 1 <= count <= num_clients:
        raise ConfigError(f"cannot select {count} of {num_clients} clients")


def select_uniform(seed: int, round_: int, num_clients: int, count: int) -> list[int]:
    """Return ``count`` distinct clients out of ``num_clients``, uniformly, sorted.

    The stream is ``(seed, CLIENT_SAMPLING, round)``.
    """
    _check(num_clients, count)
    draw = stream(seed, purpose=Purpose.CLIENT_SAMPLING, round=round_)
    return sorted(int(c) for c in draw.choice(num_clients, count))


def select_poisson(seed: int, round_: int, num_clients: int, rate: float) -> list[int]:
    """Return the clients ``k`` whose uniform draw ``u_k`` is below ``rate``, sorted.

    ``u_0, ..., u_{N-1}`` come from the stream ``(seed, CLIENT_SAMPLING, round)``, so each
    client is in the round independently with probability ``rate``.

    Raises:
        ConfigError: A rate outside ``(0, 1]``.
    """
    if not (math.isfinite(rate) and 0 < rate <= 1):
        raise ConfigError(f"the Poisson sampling rate must be in (0, 1], got {rate}")
    draw = stream(seed, purpose=Purpose.CLIENT_SAMPLING, round=round_).random(num_clients)
    return [int(c) for c in np.flatnonzero(draw < rate)]


def select_by_size(seed: int, round_: int, sizes: Sequence[int], count: int) -> list[int]:
    """Return ``count`` distinct clients drawn with probability proportional to ``sizes``.

    Each client gets the key ``log(u_k) / n_k`` with ``u_k`` uniform in ``(0, 1)`` from
    the stream ``(seed, CLIENT_SAMPLING, round)``; the ``count`` largest keys win
    (Efraimidis and Spirakis, 2006). A client with no data is chosen only when there are
    not enough others.

    Args:
        seed: The experiment seed.
        round_: The round (0-based).
        sizes: ``n_k`` for every client.
        count: How many to select.

    Returns:
        The selected clients, sorted.
    """
    _check(len(sizes), count)
    u = stream(seed, purpose=Purpose.CLIENT_SAMPLING, round=round_).random(len(sizes))
    keys = [
        math.log(max(float(x), 1e-300)) / n if n > 0 else -math.inf
        for x, n in zip(u.tolist(), sizes, strict=True)
    ]
    order = sorted(range(len(sizes)), key=lambda k: (-keys[k], k))
    return sorted(order[:count])


def power_of_choice(
    seed: int,
    round_: int,
    sizes: Sequence[int],
    count: int,
    candidates: int,
    loss_of: Callable[[int], float],
) -> list[int]:
    """Return the ``count`` highest-loss clients out of ``candidates`` drawn by size.

    Args:
        seed: The experiment seed.
        round_: The round (0-based).
        sizes: ``n_k`` for every client.
        count: How many train (``m``).
        candidates: How many are asked for their loss (``d``, ``m <= d <= N``).
        loss_of: The global model's loss on a client's training data.

    Returns:
        The selected clients, sorted.

    Raises:
        ConfigError: ``candidates`` out of ``[count, len(sizes)]``.
    """
    if not count <= candidates <= len(sizes):
        raise ConfigError(
            f"power-of-choice needs count <= candidates <= clients, got {count} clients per "
            f"round, {candidates} candidates and {len(sizes)} clients"
        )
    pool = select_by_size(seed, round_, sizes, candidates)
    losses = np.array([loss_of(c) for c in pool], dtype=np.float64)
    if not np.isfinite(losses).all():
        bad = [c for c, v in zip(pool, losses.tolist(), strict=True) if not math.isfinite(v)]
        raise NonFiniteError(
            f"power-of-choice: the global model's loss is not finite on clients {bad}"
        )
    order = sorted(range(len(pool)), key=lambda i: (-losses[i], pool[i]))
    return sorted(pool[i] for i in order[:count])
