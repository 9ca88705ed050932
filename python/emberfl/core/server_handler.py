"""The server-side protocol of a federated-learning algorithm.

A server handler owns the global state (usually the global model), decides which clients
take part in a round, packs what is broadcast to them, and folds their uplink packages back
into the global state. It is BlazeFL 3.0's ``BaseServerHandler`` with the same method names
and semantics.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["BaseServerHandler"]

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", covariant=True)


class BaseServerHandler(Protocol[UplinkPackage, DownlinkPackage]):
    """Server-side operations of a federated-learning algorithm.

    Subclass it (or just implement the methods: it is a :class:`typing.Protocol`) and
    drive it with a loop like::

        while not handler.is_stopped():
            cids = handler.sample_clients()
            trainer.local_process(handler.downlink_package(), cids)
            for package in trainer.uplink_package():
                handler.load(package)

    ``UplinkPackage`` is what a client sends back, ``DownlinkPackage`` what the server
    broadcasts; both are usually dataclasses.
    """

    def downlink_package(self) -> DownlinkPackage:
        """Build the package broadcast to the clients of this round.

        Returns:
            The downlink package (for FedAvg, the serialized global model).
        """
        ...

    def sample_clients(self) -> list[int]:
        """Choose the clients that take part in the current round.

        Returns:
            The ids of the selected clients.
        """
        ...

    def is_stopped(self) -> bool:
        """Tell whether training is finished.

        The default implementation forwards to :meth:`if_stop` when a subclass written
        for BlazeFL 2.x overrides only that.

        Returns:
            ``True`` once no further round should run.

        Raises:
            NotImplementedError: If neither ``is_stopped`` nor ``if_stop`` is overridden.
        """
        if type(self).if_stop is not BaseServerHandler.if_stop:
            return self.if_stop()
        raise NotImplementedError(
            f"{type(self).__name__} must implement is_stopped() (or BlazeFL 2.x's if_stop())"
        )

    def if_stop(self) -> bool:
        """BlazeFL 2.x's name for :meth:`is_stopped`, kept as an alias.

        Returns:
            The value of :meth:`is_stopped`.
        """
        return self.is_stopped()

    def global_update(self, buffer: list[UplinkPackage]) -> None:
        """Fold a round's uplink packages into the global state.

        Args:
            buffer: The packages of one round, in the order the clients were listed in
                ``cid_list``.
        """
        ...

    def load(self, payload: UplinkPackage) -> bool:
        """Receive one client's uplink package.

        Implementations usually buffer the package and call :meth:`global_update` once
        every client of the round has reported.

        Args:
            payload: One client's uplink package.

        Returns:
            ``True`` if this package completed the round (a global update happened).
        """
        ...
