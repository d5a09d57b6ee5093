"""Put the API together for ``serve --api-listen``: store, tokens, app, listener.

:func:`start` is the one thing :mod:`tether.home.server` calls; it hands in a
:class:`~tether.home.api.app.Backend` (what the API may ask of the running
home) and gets back an :class:`ApiService` to stop at shutdown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tether.home.api.app import Api, Backend, Limits
from tether.home.api.listener import ApiListener, api_names, ensure_certificate, tls_context
from tether.home.api.tokens import ACCESS_TOKEN_SECONDS, Tokens, load_signing_key
from tether.home.apistore import ApiStore
from tether.home.logs import event
from tether.home.paths import StatePaths

log = logging.getLogger("tether.home.api")


@dataclass
class ApiService:
    listener: ApiListener
    store: ApiStore
    api: Api

    def address(self) -> str:
        return self.listener.address()

    async def stop(self) -> None:
        await self.listener.stop()
        self.store.close()


async def start(paths: StatePaths, host: str, port: int, backend: Backend, *,
                issuer: str | None = None, limits: Limits | None = None,
                token_seconds: int = ACCESS_TOKEN_SECONDS) -> ApiService:
    """Certificate (issued on first use), bind, then serve; ``issuer`` defaults to
    ``https://<first name of the API certificate>:<bound port>``."""
    ensure_certificate(paths)
    listener = ApiListener(host, port, tls_context(paths))
    _, bound_port = listener.bind()
    names = api_names(paths) or [host]
    name = f"[{names[0]}]" if ":" in names[0] else names[0]
    issuer = (issuer or f"https://{name}:{bound_port}").rstrip("/")
    store = ApiStore(paths.api_db)
    tokens = Tokens(store, load_signing_key(paths.api_signing_key), issuer, token_seconds)
    api = Api(backend, store, tokens, limits)
    await listener.start(api.app())
    event(log, logging.INFO, "api_listening", address=listener.address(), issuer=issuer,
          scim=any(getattr(r, "path", "").startswith("/scim") for r in api.scim_mount()))
    return ApiService(listener, store, api)
