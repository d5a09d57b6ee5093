"""The one exception home's request handlers raise: a protocol error code plus advice."""

from __future__ import annotations

from typing import Any

from tether.protocol import ErrorCode


class HomeError(Exception):
    """Refuse a request with a specific :class:`~tether.protocol.ErrorCode`.

    ``detail`` tells the peer (and the log) what was wrong and what to do;
    ``extra`` fields travel in the error body (e.g. ``limit`` for clones).
    """

    def __init__(self, code: ErrorCode, detail: str, **extra: Any) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = ErrorCode(code)
        self.detail = detail
        self.extra = extra


class RequestFailed(HomeError):
    """An agent answered one of home's requests with an error message."""


class AgentUnavailable(HomeError):
    """No connected agent can take the request (none connected, or it went away)."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, detail)
