"""The exceptions home's request handlers raise: a protocol error code plus advice.

Both are the protocol's own (:class:`tether.protocol.HandlerError`,
:class:`tether.protocol.RequestFailed`), one per concept for agent and home;
home names the first ``HomeError`` as its handlers always have.
"""

from __future__ import annotations

from tether.protocol import ErrorCode, HandlerError, RequestFailed

#: Refuse a request with a specific :class:`~tether.protocol.ErrorCode`.
#: ``detail`` tells the peer (and the log) what was wrong and what to do;
#: ``extra`` fields travel in the error body (e.g. ``limit`` for clones).
HomeError = HandlerError

__all__ = ["AgentUnavailable", "HomeError", "RequestFailed"]


class AgentUnavailable(HomeError):
    """No connected agent can take the request (none connected, or it went away)."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, detail)
