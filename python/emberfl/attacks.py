"""Simulated Byzantine clients: who they are and what they send.

A run's malicious clients are a fixed set, drawn once from the stream ``(seed,
MALICIOUS)`` (:func:`malicious_clients`), so every mode, parallelism and resumed run
attacks with the same clients. What they do:

* ``label-flip``: they train on flipped labels, ``y -> C - 1 - y`` (a data poisoning
  attack, Biggio et al., 2012; :func:`flip_labels` changes their training split only);
* ``sign-flip``: they send ``-scale * delta``, the update reversed (and enlarged: ``scale``
  defaults to 4, so that 20% of the clients outweigh the rest in a plain mean);
* ``scale``: they send ``scale * delta``, a boosted update (default ``scale`` 10;
  Bagdasaryan et al., 2020);
* ``gaussian``: they send Gaussian noise ``N(0, std^2)`` of the update's size, drawn from
  the stream ``(seed, ATTACK, cid, round)`` (Blanchard et al., 2017).

Update attacks (:class:`Attack`) act on the algorithm's main stream (``delta``) as the
server receives it (:class:`~emberfl.simulation.Simulation`'s ``attack``), which is what a
malicious client would have sent; the client's other streams and its state are honest.

Example:
    >>> from emberfl.attacks import Attack, malicious_clients
    >>> bad = malicious_clients(seed=0, num_clients=10, fraction=0.2)
    >>> len(bad)
    2
    >>> import torch
    >>> attack = Attack("sign-flip", bad, seed=0, scale=1.0)
    >>> attack.poison(min(bad), 0, torch.ones(3)).tolist()
    [-1.0, -1.0, -1.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream

__all__ = [
    "ATTACKS",
    "DEFAULT_SCALE",
    "UPDATE_ATTACKS",
    "Attack",
    "flip_labels",
    "malicious_clients",
]

ATTACKS = ("none", "label-flip", "sign-flip", "gaussian", "scale")
"""The attacks by name (``--attack``)."""
UPDATE_ATTACKS = ("sign-flip", "gaussian", "scale")
"""The attacks on what clients send (the others poison their data)."""
DEFAULT_SCALE = {"sign-flip": 4.0, "scale": 10.0}
"""The default ``scale`` of the attacks that use one."""


def malicious_clients(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """Return the run's malicious clients: ``round(fraction * num_clients)`` of them, the
    first of a permutation drawn from the stream ``(seed, MALICIOUS)``.

    Args:
        seed: The experiment seed.
        num_clients: Clients in the federation.
        fraction: The malicious fraction, in ``(0, 1)``.

    Returns:
        The malicious client ids.

    Raises:
        ConfigError: A fraction outside ``(0, 1)``, or one that makes no client malicious.
    """
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"malicious_fraction must be in (0, 1), got {fraction}")
    count = round(fraction * num_clients)
    if count == 0:
        raise ConfigError(
            f"malicious_fraction={fraction} of {num_clients} clients is no malicious client; "
            f"raise it to at least {1 / num_clients:.3g}"
        )
    order = stream(seed, purpose=Purpose.MALICIOUS).permutation(num_clients)
    return frozenset(int(c) for c in order[:count])


class Attack:
    """What the malicious clients send instead of their update.

    Attributes:
        kind: One of :data:`UPDATE_ATTACKS`.
        malicious: The malicious client ids.
        seed: The experiment seed (the Gaussian attack's noise).
        scale: The factor of ``sign-flip`` (which sends ``-scale * delta``) and ``scale``.
        std: The ``gaussian`` attack's standard deviation.
    """

    def __init__(
        self,
        kind: str,
        malicious: Iterable[int],
        *,
        seed: int,
        scale: float | None = None,
        std: float = 1.0,
    ) -> None:
        """Create the attack.

        Args:
            kind: ``"sign-flip"``, ``"gaussian"`` or ``"scale"``.
            malicious: The malicious client ids (at least one).
            seed: The experiment seed.
            scale: The factor of ``sign-flip`` (> 0) and ``scale`` (finite, not 0);
                ``None``: :data:`DEFAULT_SCALE`.
            std: The standard deviation of ``gaussian`` (> 0).

        Raises:
            ConfigError: An unknown kind, no malicious client, or a value out of range.
        """
        if kind not in UPDATE_ATTACKS:
            raise ConfigError(
                f"unknown update attack {kind!r}; expected one of {', '.join(UPDATE_ATTACKS)}"
            )
        self.kind = kind
        self.malicious = frozenset(int(c) for c in malicious)
        if not self.malicious:
            raise ConfigError(f"attack {kind!r} needs at least one malicious client")
        self.seed = seed
        if scale is None:
            scale = DEFAULT_SCALE.get(kind, 1.0)
        if not (math.isfinite(scale) and scale != 0):
            raise ConfigError(f"attack_scale must be a finite number other than 0, got {scale}")
        if kind == "sign-flip" and scale < 0:
            raise ConfigError(
                f"sign-flip's attack_scale must be > 0 (it sends -scale * delta), got {scale}"
            )
        if not (math.isfinite(std) and std > 0):
            raise ConfigError(f"attack_std must be a positive number, got {std}")
        self.scale = float(scale)
        self.std = float(std)

    def poison(self, cid: int, round: int, update: torch.Tensor) -> torch.Tensor:
        """Return what client ``cid`` sends in round ``round`` instead of ``update`` (a new
        tensor; ``update`` itself for an honest client).

        Args:
            cid: The client.
            round: The round (0-based).
            update: Its honest flat update.

        Returns:
            The update the server receives.
        """
        if cid not in self.malicious:
            return update
        if self.kind == "sign-flip":
            return update * -self.scale
        if self.kind == "scale":
            return update * self.scale
        noise = stream(self.seed, purpose=Purpose.ATTACK, client=cid, round=round).normal(
            update.numel()
        )
        return torch.from_numpy(noise).to(torch.float32).mul_(self.std).view_as(update)

    def __repr__(self) -> str:
        """Return ``Attack(kind, clients, ...)``."""
        scale = f", scale={self.scale}"
        extra = {"scale": scale, "sign-flip": scale, "gaussian": f", std={self.std}"}
        return f"Attack({self.kind!r}, {sorted(self.malicious)}{extra.get(self.kind, '')})"


def flip_labels(dataset: Any, clients: Iterable[int], num_classes: int) -> None:
    """Flip the training labels of ``clients`` in ``dataset``: ``y -> num_classes - 1 - y``.

    Only the clients' own training splits change; the server's view of the training split
    and every test split keep the true labels.

    Args:
        dataset: A :class:`~emberfl.data.partitioned.TensorPartitionedDataset`.
        clients: The malicious clients.
        num_classes: The number of classes.

    Raises:
        ConfigError: A client the data set does not have.
    """
    labels = dataset.client_train_y.clone()
    for cid in clients:
        if not 0 <= cid < dataset.num_clients:
            raise ConfigError(f"client {cid} does not exist: there are {dataset.num_clients}")
        rows = dataset.client_index[cid]
        labels[rows] = num_classes - 1 - labels[rows]
    dataset.client_train_y = labels
