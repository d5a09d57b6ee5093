"""What home's parts see of connected agents: one socket, and the set of them.

Why these are interfaces and not the classes: the hub, the directory router
and the update service only ask a socket who it is and send it requests; they
must not know the asyncio adapter that implements it
(:class:`tether.home.peer.AgentPeer`), which in turn calls the hub. Typing them
against these protocols keeps that adapter and its callers apart (no module
imports one that imports it back) and lets a test hand in any object of the
same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from tether import protocol as p
from tether.home.gate import Identity


class AgentSocket(Protocol):
    """One established agent WebSocket, as the rest of home uses it."""

    #: who authenticated (role, connector, image, instance, certificate serial)
    identity: Identity
    #: home's own id of the socket (the socket table's key)
    socket_id: str
    #: the remote address, for log lines
    peer: str
    #: the WebSocket (``close_code`` is None while it is open; ``close()``)
    ws: Any
    #: the protocol session (``established`` once hello was answered)
    session: p.Session
    #: the agent's hello body, None before it
    hello: dict | None
    #: the agent announced that it rotates this socket out
    draining: bool

    async def request(self, op: p.Op, body: dict, timeout: float = ...) -> p.Message: ...

    def stream(self, op: p.Op, body: dict, timeout: float = ...) -> AsyncIterator[p.Message]: ...

    async def flush(self) -> None: ...


class ConnectedAgents(Protocol):
    """The registry of connected sockets and "ask some agent" (the hub implements it)."""

    #: socket id -> socket, every role
    peers: dict[str, AgentSocket]

    def agents(self, connector: str | None = None, *,
               cluster: str | None = None) -> list[AgentSocket]: ...

    async def request(self, connector: str | None, op: p.Op, body: dict, timeout: float = ...,
                      *, cluster: str | None = None, failover: bool | None = None,
                      peers: list[AgentSocket] | None = None,
                      chunks: list[p.Message] | None = None) -> p.Message: ...
