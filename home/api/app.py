"""The Starlette application behind ``--api-listen``.

Routes (docs/CONTRACTS.md "HTTPS API"):

* ``POST /oauth2/token`` — client credentials (RFC 6749 §4.4), JWT access tokens (RFC 9068)
* ``GET /.well-known/oauth-authorization-server`` — RFC 8414 metadata
* ``POST /v1/directories/{directory}/authenticate`` — password check (scope ``authenticate``)
* ``GET /healthz``, ``GET /readyz`` — no token
* ``GET /metrics`` — Prometheus text (scope ``status:read``)
* ``GET /status`` — the read-only status page (scope ``status:read``; a browser
  signs in once with a form that stores the token in an HttpOnly cookie)
* ``/scim/v2/{directory}/...`` — SCIM 2.0, mounted from :mod:`tether.home.api.scim`
  when that module is installed

The app gets a :class:`Backend` (what it may ask of the running home), never the
server itself. :class:`Guard` wraps everything: it bounds request bodies (413),
the time a client may take to send one (408), audits every call and counts it
in the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from tether.home.api import metrics as api_metrics
from tether.home.api import scim
from tether.home.api import statuspage
from tether.home.api.tokens import Caller, Refusal, Tokens
from tether.home.apistore import SCOPES, ApiStore
from tether.home.logs import event
from tether.home.ratelimit import RateLimit

log = logging.getLogger("tether.home.api")
#: Largest request body read (token requests, authentications, SCIM documents).
MAX_BODY_BYTES = 64 * 1024
#: Time a client may take to send its body once the headers are in.
BODY_SECONDS = 10.0
MAX_USERNAME = 256
MAX_PASSWORD = 1024
COOKIE = "tether_status_token"
FAILED_OUTCOMES = frozenset({"wrong_password", "unknown_user", "locked"})


@dataclass
class Limits:
    """Throttles of the authenticate endpoint and of every client
    (:class:`~tether.home.ratelimit.RateLimit` buckets).

    user_failures: failed attempts (wrong password, unknown user, locked) per
    (directory, user name): 3 at once, then one per 10 minutes, below the
    usual lockout thresholds (5-10 failures), so a client cannot lock an
    account nor guess its password; once spent, the user name answers 429
    (also for the right password) until a token returns. Only one attempt per
    user name is in flight at a time, so parallel requests cannot overrun
    the budget before their failures are counted. client_failures: failures
    per client across names (guessing many accounts). per_client: every call.
    """

    user_failures: RateLimit = field(default_factory=lambda: RateLimit(1 / 600, 3,
                                                                       max_keys=100_000))
    client_failures: RateLimit = field(default_factory=lambda: RateLimit(5, 200))
    per_client: RateLimit = field(default_factory=lambda: RateLimit(5000, 5000))


@dataclass
class Backend:
    """What the API may ask of the running home (handed in by the server)."""

    #: ``authenticate(directory, username, password, groups=True)`` through home's
    #: directory routing: the control socket's reply.
    authenticate: Callable[..., Awaitable[dict]]
    #: ``provision`` likewise (for SCIM).
    provision: Callable[[str, dict], Awaitable[dict]]
    #: The status document (:func:`tether.home.api.statuspage.collect`).
    status: Callable[[], dict]
    #: (ready, reason) for /readyz.
    ready: Callable[[], tuple[bool, str]]
    #: Home's identity store (SCIM reads it).
    directory_store: object


def _json_error(status: int, error: str, description: str, headers: dict | None = None):
    return JSONResponse({"error": error, "error_description": description}, status,
                        headers=headers)


def _note(request: Request, op: str, outcome: str | None = None, caller: Caller | None = None,
          client: str | None = None, detail: str | None = None) -> None:
    """What the audit row and the metrics of this call say (read by :class:`Guard`)."""
    state = request.scope.setdefault("state", {})
    state["op"] = op
    if outcome is not None:
        state["outcome"] = outcome
    if caller is not None:
        state["client"], state["credential"] = caller.client, caller.credential
    elif client is not None:
        state["client"] = client
    if detail is not None:
        state["detail"] = detail


class Api:
    """The endpoints; :meth:`app` builds the Starlette application."""

    def __init__(self, backend: Backend, store: ApiStore, tokens: Tokens,
                 limits: Limits | None = None, metrics: api_metrics.Metrics | None = None) -> None:
        self.backend, self.store, self.tokens = backend, store, tokens
        self.limits = limits or Limits()
        self._in_flight: set[str] = set()  # user names with an attempt under way
        self.metrics = metrics or api_metrics.Metrics(backend.status)

    def app(self) -> Guard:
        routes: list[BaseRoute] = [
            Route("/oauth2/token", self.token, methods=["POST"]),
            Route("/.well-known/oauth-authorization-server", self.metadata, methods=["GET"]),
            Route("/v1/directories/{directory}/authenticate", self.authenticate,
                  methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/status", self.status_page, methods=["GET"]),
            Route("/status/session", self.status_session, methods=["POST"]),
        ]
        routes += self.scim_mount()
        return Guard(Starlette(routes=routes), self.store, self.metrics)

    def scim_mount(self) -> list[BaseRoute]:
        """SCIM 2.0 (:mod:`tether.home.api.scim`) under /scim/v2/{directory}."""
        return [Mount("/scim/v2/{directory}",
                      routes=scim.scim_routes(directory_store=self.backend.directory_store,
                                              provision=self.backend.provision,
                                              authorize=self.authorize))]

    # ------------------------------------------------------------ authorization

    async def authorize(self, request: Request, scope: str) -> Response | None:
        """For mounted apps (SCIM): None = allowed, else the SCIM error response to send."""
        found = self._check(request, scope)
        if isinstance(found, Caller):
            return None
        return JSONResponse({"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                             "status": str(found.status), "detail": found.description},
                            found.status, media_type="application/scim+json",
                            headers={"WWW-Authenticate": found.challenge(scope)})

    def _check(self, request: Request, scope: str, token: str | None = None) -> Caller | Refusal:
        header = request.headers.get("authorization")
        if header is None and token:
            header = f"Bearer {token}"
        found = self.tokens.check(header, scope)
        if isinstance(found, Caller):
            _note(request, request.scope.get("state", {}).get("op", "call"), caller=found)
            if not self.limits.per_client.allow(found.client):
                return Refusal(429, "rate_limited", "too many calls from this client; slow down",
                               found.client)
        else:
            _note(request, request.scope.get("state", {}).get("op", "call"),
                  outcome="refused", client=found.client, detail=found.description)
        return found

    def _refuse(self, refusal: Refusal, scope: str) -> Response:
        if refusal.status == 429:
            return _json_error(429, "rate_limited", refusal.description, {"Retry-After": "1"})
        return _json_error(refusal.status, refusal.error or "invalid_request",
                           refusal.description, {"WWW-Authenticate": refusal.challenge(scope)})

    # ------------------------------------------------------------ OAuth2

    async def token(self, request: Request) -> Response:
        _note(request, "token")
        if request.headers.get("content-type", "").split(";")[0].strip() != \
                "application/x-www-form-urlencoded":
            _note(request, "token", "invalid_request")
            return _json_error(400, "invalid_request", "send the token request as "
                               "application/x-www-form-urlencoded (RFC 6749 section 4.4.2)")
        body = await request.body()
        try:
            form = dict(parse_qsl(body.decode("utf-8"), strict_parsing=False))
        except UnicodeDecodeError:
            form = None
        if form is None:
            _note(request, "token", "invalid_request")
            return _json_error(400, "invalid_request", "the form body is not UTF-8")
        status, doc, headers = self.tokens.issue("POST", str(request.url), request.headers, form)
        client = form.get("client_id") or _basic_user(request.headers.get("authorization"))
        _note(request, "token", "issued" if status == 200 else doc.get("error", "error"),
              client=client)
        return JSONResponse(doc, status, headers=dict(headers))

    async def metadata(self, request: Request) -> Response:
        _note(request, "metadata", "ok")
        issuer = self.tokens.issuer
        return JSONResponse({
            "issuer": issuer,
            "token_endpoint": f"{issuer}/oauth2/token",
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": [],
            "scopes_supported": list(SCOPES),
            "service_documentation": f"{issuer}/status",
        })

    # ------------------------------------------------------------ authentication

    async def authenticate(self, request: Request) -> Response:
        directory = request.path_params["directory"]
        _note(request, "authenticate")
        found = self._check(request, "authenticate")
        if not isinstance(found, Caller):
            return self._refuse(found, "authenticate")
        try:
            doc = json.loads(await request.body())
        except ValueError:
            doc = None
        username = doc.get("username") if isinstance(doc, dict) else None
        password = doc.get("password") if isinstance(doc, dict) else None
        groups = doc.get("groups", True) if isinstance(doc, dict) else True
        if not isinstance(username, str) or not isinstance(password, str) or not username \
                or not password or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD \
                or not isinstance(groups, bool):
            _note(request, "authenticate", "bad_request")
            return _json_error(400, "invalid_request",
                               'send JSON {"username": "...", "password": "..."}: both '
                               f"non-empty strings, at most {MAX_USERNAME} and {MAX_PASSWORD} "
                               "characters (an empty password would be an anonymous bind), "
                               'and optionally "groups": false for the password check only')
        user_key = f"{directory}\0{username.casefold()}"
        if self.limits.client_failures.retry_after(found.client) > 0:
            return self._throttled(request, username, "this client had too many failed "
                                   "authentications; wait", self.limits.client_failures
                                   .retry_after(found.client))
        if user_key in self._in_flight:
            return self._throttled(request, username, "an attempt for this user name is in "
                                   "progress; retry in", 1)
        if self.limits.user_failures.retry_after(user_key) > 0:
            return self._throttled(request, username, "too many failed attempts for this user "
                                   "name; wait", self.limits.user_failures.retry_after(user_key))
        self._in_flight.add(user_key)
        try:
            if groups:
                reply = await self.backend.authenticate(directory, username, password)
            else:
                reply = await self.backend.authenticate(directory, username, password,
                                                        groups=False)
        finally:
            self._in_flight.discard(user_key)
        del password
        if not reply.get("ok"):
            code = reply.get("code") or "failed"
            status = {"not_found": 404, "unavailable": 503, "bad_type": 400}.get(code, 502)
            _note(request, "authenticate", code, detail=f"user={username} {reply.get('error')}")
            headers = {"Retry-After": "5"} if status == 503 else None
            return _json_error(status, code, str(reply.get("error")), headers)
        result = reply["result"]
        outcome = str(result.get("outcome") or ("success" if result.get("ok") else "error"))
        if outcome in FAILED_OUTCOMES:
            self.limits.client_failures.allow(found.client)
            self.limits.user_failures.allow(user_key)
        _note(request, "authenticate", outcome, detail=f"user={username}")
        answer = {"outcome": outcome, "dn": result.get("dn")}
        if groups:
            answer["groups"] = result.get("groups") or []
        return JSONResponse(answer)

    def _throttled(self, request: Request, username: str, text: str, wait: float) -> Response:
        seconds = max(1, int(wait + 0.999))
        _note(request, "authenticate", "throttled", detail=f"user={username}")
        return _json_error(429, "throttled", f"{text} {seconds} s", {"Retry-After": str(seconds)})

    # ------------------------------------------------------------ operations

    async def healthz(self, request: Request) -> Response:
        _note(request, "healthz", "ok")
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        ready, reason = self.backend.ready()
        _note(request, "readyz", "ready" if ready else "not_ready")
        return PlainTextResponse(("ready: " if ready else "not ready: ") + reason + "\n",
                                 200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        _note(request, "metrics")
        found = self._check(request, "status:read")
        if not isinstance(found, Caller):
            return self._refuse(found, "status:read")
        _note(request, "metrics", "ok")
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def status_page(self, request: Request) -> Response:
        _note(request, "status")
        found = self._check(request, "status:read", request.cookies.get(COOKIE))
        if not isinstance(found, Caller):
            status = 403 if found.status == 403 else 401
            return HTMLResponse(statuspage.sign_in(found.description), status,
                                headers={"WWW-Authenticate": found.challenge("status:read")})
        _note(request, "status", "ok")
        return HTMLResponse(statuspage.render(self.backend.status()),
                            headers={"Cache-Control": "no-store"})

    async def status_session(self, request: Request) -> Response:
        """The sign-in form: keep the token in an HttpOnly cookie, then show the page."""
        _note(request, "status_session")
        try:
            form = dict(parse_qsl((await request.body()).decode("utf-8")))
        except UnicodeDecodeError:
            form = {}
        token = form.get("token", "").strip()
        found = self.tokens.check(f"Bearer {token}", "status:read")
        if not isinstance(found, Caller):
            _note(request, "status_session", "refused", client=found.client,
                  detail=found.description)
            return HTMLResponse(statuspage.sign_in(found.description), found.status)
        _note(request, "status_session", "ok", caller=found)
        response = RedirectResponse("/status", 303)
        response.set_cookie(COOKIE, token, httponly=True, secure=True, samesite="strict",
                            path="/status")
        return response


def _basic_user(header: str | None) -> str | None:
    import base64
    import binascii

    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value, validate=True).decode("utf-8").partition(":")[0][:64]
    except (binascii.Error, UnicodeDecodeError):
        return None


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: body bound (413), body deadline (408), audit and metrics."""

    def __init__(self, app, store: ApiStore, metrics: api_metrics.Metrics,
                 max_body: int = MAX_BODY_BYTES, body_seconds: float = BODY_SECONDS) -> None:
        self.app, self.store, self.metrics = app, store, metrics
        self.max_body, self.body_seconds = max_body, body_seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        sent = {"status": 0}
        try:
            limit = self.limit(scope)
            length = _content_length(scope)
            if length is not None and length > limit:
                await self._too_large(scope, send, sent, limit)
                return
            try:
                body = await self._read_body(receive, limit)
            except BodyTooLarge:
                await self._too_large(scope, send, sent, limit)
                return
            except BodyTimeout:
                scope["state"]["outcome"] = "body_timeout"
                await _refuse(scope, send, 408, "the request body did not arrive within "
                              f"{self.body_seconds:.0f} s of its head; send it at once", sent)
                return
            if body is None:
                scope["state"]["outcome"] = "client_gone"
                sent["status"] = 499  # nginx's "client closed request": only for the record
                return
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay_receive():
                return replay.pop() if replay else await receive()

            async def watched_send(message):
                if message["type"] == "http.response.start":
                    sent["status"] = message["status"]
                await send(message)

            await self.app(scope, replay_receive, watched_send)
        finally:
            self._record(scope, sent["status"] or 500, time.perf_counter() - started)

    async def _read_body(self, receive, limit: int) -> bytes | None:
        """The whole body, read before the app runs; None if the client went away.

        Why before: a limit or deadline enforced while the app reads would surface
        as an exception inside Starlette, whose error middleware answers 500 before
        anyone can answer 413 or 408. Bodies are small (64 KiB, SCIM 1 MiB), so
        holding one is cheap.
        """
        deadline = time.monotonic() + self.body_seconds
        chunks: list[bytes] = []
        received = 0
        while True:
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def limit(self, scope) -> int:
        """Largest body for this path: SCIM documents may be larger (a group's members)."""
        if scope.get("path", "").startswith("/scim/"):
            return max(self.max_body, scim.MAX_BODY)
        return self.max_body

    async def _too_large(self, scope, send, sent, limit: int) -> None:
        scope["state"]["outcome"] = "too_large"
        await _refuse(scope, send, 413, f"request body above {limit} bytes; send less "
                      "per request", sent)

    def _record(self, scope, status: int, seconds: float) -> None:
        state = scope.get("state", {})
        op = state.get("op") or ("not_found" if status == 404 else "other")
        outcome = state.get("outcome") or str(status)
        self.metrics.observe(op, outcome, seconds)
        client = scope.get("client")
        try:
            self.store.audit(client=state.get("client"), credential=state.get("credential"),
                             peer=f"{client[0]}:{client[1]}" if client else None,
                             method=scope.get("method", "?"), path=scope.get("path", "?"),
                             op=op, status=status, outcome=outcome, detail=state.get("detail"))
        except Exception as exc:  # the audit must never turn an answer into a crash
            event(log, logging.ERROR, "audit_failed", error=str(exc), op=op)


class BodyTimeout(Exception):
    pass


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope, send, status: int, text: str, sent: dict) -> None:
    """A refusal before the app answered, in the error format of the path's protocol.

    Why per path: a SCIM client parses RFC 7644's error schema, an OAuth2 client
    RFC 6749's ``error``/``error_description``; both get ``Connection: close``,
    since the unread rest of the body makes the connection unusable.
    """
    if scope.get("path", "").startswith("/scim/"):
        body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                "status": str(status), "detail": text}
        media = b"application/scim+json"
    else:
        body = {"error": "invalid_request", "error_description": text}
        media = b"application/json"
    data = json.dumps(body).encode()
    sent["status"] = status
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
