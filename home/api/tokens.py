"""OAuth2 for the HTTPS API: the client-credentials grant and the bearer-token check.

Authlib does the protocol: :class:`TokenServer` is an Authlib
``AuthorizationServer`` with the client-credentials grant (RFC 6749 §4.4,
``client_secret_basic`` and ``client_secret_post``) whose access tokens are
RFC 9068 JWTs (``typ: at+jwt``, ES256, short-lived), made by Authlib's
``JWTBearerTokenGenerator`` and checked by its ``JWTBearerTokenValidator``.
Home adds what a library cannot know: clients and long-lived tokens live in
:class:`~tether.home.apistore.ApiStore`, and every check reads the client's
row, so revoking a client refuses its JWTs at once, not when they expire.

:meth:`Tokens.check` answers with a :class:`Caller` or a :class:`Refusal`
carrying RFC 6750's status and ``WWW-Authenticate`` challenge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidScopeError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750.errors import InvalidTokenError
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator, JWTBearerTokenValidator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from tether.home.apistore import SCOPES, TOKEN_PREFIX, ApiStore
from tether.home.paths import write_private

#: Lifetime of a JWT access token: short, the client fetches a new one (RFC 9068 §5).
ACCESS_TOKEN_SECONDS = 300
REALM = "tether-home"


def load_signing_key(path: Path) -> ECKey:
    """The ES256 key that signs access tokens; made (0600) the first time it is needed."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return ECKey.import_key(path.read_bytes())


class ApiClient(ClientMixin):
    """One row of ``clients`` as Authlib's client model."""

    def __init__(self, row: dict, store: ApiStore) -> None:
        self.row, self.store = row, store

    def get_client_id(self):
        return self.row["name"]

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        """No ``scope`` asks for all it holds; asking for one it lacks is ``invalid_scope``."""
        if not scope:
            return " ".join(self.row["scopes"])
        lacking = [s for s in scope.split() if s not in self.row["scopes"]]
        if lacking:
            raise InvalidScopeError(f"client {self.row['name']} does not hold "
                                    f"{' '.join(lacking)}")
        return " ".join(scope.split())

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return self.store.verify_client(self.row["name"], client_secret) is not None

    def check_endpoint_auth_method(self, method, endpoint):
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


class _FormRequest(OAuth2Request):
    """A token request whose form body Starlette has already read."""

    def __init__(self, method: str, uri: str, headers, form: dict) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = form
        self.payload = BasicOAuth2Payload(form)

    @property
    def form(self):
        return self._form

    @property
    def args(self):
        return {}


class _Grant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class _Generator(JWTBearerTokenGenerator):
    def __init__(self, key: ECKey, issuer: str, audience: str, lifetime: int) -> None:
        super().__init__(issuer=issuer, alg="ES256", expires_generator=lifetime)
        self.key, self.audience = key, audience

    def get_jwks(self):
        return self.key

    def get_audiences(self, client, user, scope):
        return self.audience


class _Validator(JWTBearerTokenValidator):
    def __init__(self, key: ECKey, issuer: str, audience: str) -> None:
        super().__init__(issuer=issuer, resource_server=audience, realm=REALM)
        self.key = key

    def get_jwks(self):
        return self.key


class TokenServer(AuthorizationServer):
    """Authlib's authorization server over home's client table (token endpoint only)."""

    def __init__(self, store: ApiStore, generator: _Generator) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.store = store
        self.register_grant(_Grant)
        self.register_token_generator("default", generator)

    def query_client(self, client_id):
        row = self.store.active_client(client_id) if isinstance(client_id, str) else None
        return ApiClient(row, self.store) if row else None

    def save_token(self, token, request):
        """JWTs are self-contained: nothing to save (the call is audited)."""

    def create_oauth2_request(self, request):
        return request  # built by :meth:`Tokens.issue` from the already-read body

    def handle_response(self, status, body, headers):
        return status, body, headers

    def send_signal(self, name, *args, **kwargs):
        pass


@dataclass(frozen=True)
class Caller:
    """Who is calling: the client, which credential (``jwt:<jti>`` / ``token:<id>``), scopes."""

    client: str
    credential: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Refusal:
    """RFC 6750 §3: 401 (no/bad token) or 403 (insufficient scope), with the challenge."""

    status: int
    error: str | None
    description: str
    client: str | None = None

    def challenge(self, scope: str | None = None) -> str:
        parts = [f'Bearer realm="{REALM}"']
        if self.error:
            parts.append(f'error="{self.error}"')
            parts.append(f'error_description="{self.description}"')
        if scope and self.error == "insufficient_scope":
            parts.append(f'scope="{scope}"')
        return ", ".join(parts)


class Tokens:
    """Issue access tokens and check bearer tokens of either kind."""

    def __init__(self, store: ApiStore, key: ECKey, issuer: str,
                 lifetime: int = ACCESS_TOKEN_SECONDS) -> None:
        self.store, self.issuer, self.lifetime = store, issuer, lifetime
        self.server = TokenServer(store, _Generator(key, issuer, issuer, lifetime))
        self.validator = _Validator(key, issuer, issuer)

    def issue(self, method: str, uri: str, headers, form: dict) -> tuple[int, dict, list]:
        """The token endpoint: (status, JSON body, headers) from Authlib."""
        request = _FormRequest(method, uri, headers, form)
        status, body, out_headers = self.server.create_token_response(request)
        return status, body, list(out_headers)

    def check(self, authorization: str | None, scope: str) -> Caller | Refusal:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Refusal(401, None, "send Authorization: Bearer <token>")
        if len(token) > 4096:
            return Refusal(401, "invalid_token", "the token is too long")
        if token.startswith(TOKEN_PREFIX):
            row = self.store.verify_token(token)
            if row is None:
                return Refusal(401, "invalid_token", "unknown or revoked token")
            caller = Caller(row["name"], f"token:{row['token_id']}", tuple(row["scopes"]))
        else:
            caller = self._jwt(token)
            if isinstance(caller, Refusal):
                return caller
        if scope not in caller.scopes:
            return Refusal(403, "insufficient_scope", f"this call needs scope {scope}",
                           caller.client)
        return caller

    def _jwt(self, token: str) -> Caller | Refusal:
        try:
            claims = self.validator.authenticate_token(token)
            if str(claims.header.get("typ", "")).lower() not in ("at+jwt", "application/at+jwt"):
                raise InvalidTokenError()
            claims.validate(now=int(time.time()))
        except (InvalidTokenError, JoseError, ValueError, TypeError):
            return Refusal(401, "invalid_token", "the access token is invalid or expired; "
                           "fetch a new one at the token endpoint")
        client = claims.get("client_id")
        row = self.store.active_client(client) if isinstance(client, str) else None
        if row is None:
            return Refusal(401, "invalid_token", "this client was revoked", client)
        granted = str(claims.get("scope") or "").split()
        # A scope taken from the client since the token was issued is gone at once too.
        scopes = tuple(s for s in granted if s in row["scopes"])
        return Caller(client, f"jwt:{claims.get('jti')}", scopes)
