"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh et al., 2020, "An Efficient
Framework for Clustered Federated Learning"), with model averaging (its option II).

The server keeps ``k`` cluster models (server state; cluster 0 is the initial model, the
others the initial model plus Gaussian noise of standard deviation ``init_scale`` drawn
from the stream ``(seed, MODEL_INIT, j)``, as the paper starts from random models) and
broadcasts all of them. Each sampled client evaluates every cluster model's loss on its
training data, takes the lowest (ties to the lower index), trains that model with local
SGD and sends its update in that cluster's stream, weighted by its number of samples (0
in the other streams). The server moves each cluster by the weighted mean of its
clients' updates; a cluster no client chose stays as it was. The client's choice is kept
(client state): it is judged with that cluster's model on its own test split.

``state.model``, what the CLI reports as the global model, is the cluster chosen by the
most training samples in the last round.

Not vectorizable: each client picks its model first.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import (
    Aggregate,
    Client,
    ClientResult,
    ModelLayout,
    ServerState,
    StreamSpec,
    check_positive,
)
from emberfl.algorithms.local_sgd import LocalSGD, train_locally
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream

__all__ = ["IFCA"]


class IFCA(LocalSGD):
    """``k`` cluster models; each client trains the one that fits its data best.

    Attributes:
        clusters: ``k`` (>= 1; 1 is FedAvg).
        init_scale: Standard deviation of the noise that sets clusters 1..k-1 apart.
        seed: The seed of that noise.
    """

    name: ClassVar[str] = "ifca"
    summary: ClassVar[str] = "clustered FL: each client trains the best of k models (Ghosh 2020)"
    vectorizable: ClassVar[bool] = False
    local_dp: ClassVar[bool] = False  # its cluster choice reads the data
    personalised: ClassVar[bool] = True
    main_stream: ClassVar[str] = "delta0"

    def __init__(
        self,
        *,
        lr: float,
        clusters: int = 2,
        init_scale: float = 0.1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """Set the hyper-parameters.

        Args:
            lr: Local learning rate (> 0).
            clusters: ``k`` (>= 1).
            init_scale: The initial clusters' spread (>= 0).
            seed: The seed of the clusters' initial noise.
            **kwargs: :class:`~emberfl.algorithms.local_sgd.LocalSGD`'s other options.

        Raises:
            ConfigError: For a value out of range.
        """
        super().__init__(lr=lr, **kwargs)
        if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
            raise ConfigError(f"clusters must be an integer >= 1, got {clusters!r}")
        self.clusters = clusters
        self.init_scale = check_positive("init_scale", init_scale, allow_zero=True)
        self.seed = seed

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        """One update stream per cluster, weighted by the client's samples when chosen."""
        return {f"delta{j}": StreamSpec(layout.dim, "result") for j in range(self.clusters)}

    def client_state(self, layout: ModelLayout) -> dict[str, int]:
        """The cluster the client chose last."""
        return {"cluster": 1}

    def init_server(self, model: torch.Tensor, layout: ModelLayout) -> ServerState:
        """Return cluster 0 = the initial model, the others spread around it."""
        state = super().init_server(model, layout)
        for j in range(self.clusters):
            noise = torch.zeros(layout.dim)
            if j > 0 and self.init_scale > 0:
                draw = stream(self.seed, purpose=Purpose.MODEL_INIT, client=j)
                noise = torch.from_numpy(draw.normal(layout.dim)).to(torch.float32)
                noise.mul_(self.init_scale)
            state.tensors[f"cluster{j}"] = state.model + noise
        return state

    def broadcast(self, state: ServerState) -> dict[str, torch.Tensor]:
        """Send every cluster model (``model`` is the most chosen one)."""
        out = {"model": state.model}
        out.update({f"cluster{j}": state.tensors[f"cluster{j}"] for j in range(self.clusters)})
        return out

    def personal_model(
        self, state: dict[str, torch.Tensor], server: ServerState, layout: ModelLayout
    ) -> torch.Tensor | None:
        """Return the cluster model the client chose last."""
        return server.tensors[f"cluster{int(state['cluster'][0])}"]

    def client_update(self, client: Client) -> ClientResult:
        """Pick the lowest-loss cluster, train it, send its update in its stream."""
        from emberfl.core import deserialize_model

        client.load_global()
        losses = []
        for j in range(self.clusters):
            deserialize_model(client.model, client.broadcast[f"cluster{j}"])
            losses.append(client.mean_loss())
        chosen = min(range(self.clusters), key=lambda j: (losses[j], j))
        start = client.broadcast[f"cluster{chosen}"]
        result, metrics = train_locally(self, client, start=start)
        client.state["cluster"].fill_(float(chosen))
        delta = result.model - start
        uplink = {
            f"delta{j}": delta if j == chosen else torch.zeros_like(delta)
            for j in range(self.clusters)
        }
        weights = {
            f"delta{j}": float(client.num_samples if j == chosen else 0)
            for j in range(self.clusters)
        }
        return ClientResult(
            uplink=uplink, num_samples=client.num_samples, weights=weights, metrics=metrics
        )

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        """Move each chosen cluster by its clients' weighted mean update."""
        best, best_weight = 0, -1.0
        for j in range(self.clusters):
            weight = aggregate.weights[f"delta{j}"]
            if weight > 0:
                cluster = state.tensors[f"cluster{j}"]
                cluster.add_(aggregate.mean(f"delta{j}"), alpha=self.server_lr)
            if weight > best_weight:
                best, best_weight = j, weight
        state.model.copy_(state.tensors[f"cluster{best}"])
