"""SCIM 2.0 (RFC 7643/7644) per directory: home's users and groups for identity clouds.

Mounted by the API listener as ``Mount("/scim/v2/{directory}", routes=scim_routes(...))``.

Reads come from home's identity store (the records the directory sync keeps),
through :class:`DirectoryView`, the one place that touches the store.
Writes become provisioning orders (agent/directory/provision.py) routed to one
connector of the directory by ``provision``, exactly as ``tether-home provision``.

Read-your-writes: every order asks the agent to read the entry back
(``read_back``) on the same LDAP connection; that record, of the very shape the
sync sends, is stored at once (:meth:`DirectoryStore.put_provisioned`), so the
answer and a GET right after it show the directory's state, id included. The
change feed brings the same whole state later and rewrites the same row.

Outcomes: an order whose connector answered done is a success; a refusal is the
SCIM error its reason calls for (409 uniqueness, 400 invalidValue, 404); an
order that may or may not have been carried out (socket lost after sending,
server down mid-write) is a 503 with ``Retry-After``, never a success: every
order SCIM sends is safe to repeat (a create repeated finds the entry and
answers 409 uniqueness, a membership repeated is a no-op, a replace writes the
same values). Nothing is sent for input that does not validate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from scim2_models import (AuthenticationScheme, Bulk, ChangePassword, Context, EnterpriseUser,
                          Error, ETag, Filter, Group, ListResponse, Patch, PatchOp,
                          ResourceType, ResponseParameters, Schema, SCIMException, ScimProvider,
                          SearchRequest, ServiceProviderConfig, Sort, User)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tether.home.api import scim_filter, scim_map

log = logging.getLogger("tether.home.api.scim")

Provision = Callable[[str, dict], Awaitable[dict]]
Authorize = Callable[[Request, str], Awaitable[Response | None]]

MEDIA_TYPE = "application/scim+json"
MAX_BODY = 1 << 20            # bytes of one request body
MAX_RESULTS = 200             # resources in one list response (ServiceProviderConfig filter)
DEFAULT_COUNT = 100
MAX_FILTER = 4096             # characters of a filter
MAX_MEMBER_CHANGES = 1000     # member orders one request may cause
SCAN_CHUNK = 2000             # records matched between two yields to the event loop
RETRY_AFTER = "5"
UserModel = User[EnterpriseUser]
READ, WRITE = "directory:read", "directory:write"

PROVIDER = ScimProvider(
    models=[User, EnterpriseUser, Group],
    resource_types=[ResourceType.from_resource(UserModel), ResourceType.from_resource(Group)],
    config=ServiceProviderConfig(
        documentation_uri=None,
        patch=Patch(supported=True),
        bulk=Bulk(supported=False, max_operations=0, max_payload_size=0),
        filter=Filter(supported=True, max_results=MAX_RESULTS),
        change_password=ChangePassword(supported=True),
        sort=Sort(supported=False),
        etag=ETag(supported=False),
        authentication_schemes=[AuthenticationScheme(
            type="oauthbearertoken", name="OAuth Bearer Token", primary=True,
            description="OAuth2 client-credentials access token or a long-lived API token "
                        "(tether-home api-client)")],
    ))


class ScimError(Exception):
    """An answer in the SCIM error schema (RFC 7644 §3.12)."""

    def __init__(self, status: int, detail: str, scim_type: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.scim_type = status, detail, scim_type
        self.headers = headers or {}

    def response(self) -> Response:
        body = Error(status=self.status, scim_type=self.scim_type, detail=self.detail)
        return _json(body.model_dump(), self.status, self.headers)


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _from_library(exc: SCIMException) -> ScimError:
    return ScimError(exc.status, exc.detail, exc.scim_type or None)


def _from_validation(exc: ValidationError, what: str) -> ScimError:
    """The first problem pydantic found, as SCIM says it (scimType from scim2-models)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = ".".join(str(part) for part in first.get("loc", ()))
    kind = first.get("type", "")
    ctx = first.get("ctx") or {}
    scim_type = ctx.get("scim_type") or ("invalidFilter" if "filter" in loc
                                         else "invalidSyntax" if kind in ("json_invalid",
                                                                          "extra_forbidden")
                                         else "invalidValue")
    msg = first.get("msg", "invalid")
    if kind == "extra_forbidden":
        msg = f"unknown attribute {loc!r}; see /Schemas for the attributes this service knows"
    elif loc:
        msg = f"{loc}: {msg}"
    return ScimError(400, f"{what}: {msg}", scim_type)


# ---------------------------------------------------------------- the store adapter

class DirectoryView:
    """Every read and write of home's identity store that SCIM needs, for one directory.

    Group members are DNs in the store today; this class turns them into entry
    ids and back, so the rest of the module speaks only ids.
    """

    def __init__(self, directory_store, directory: str) -> None:
        self.directory_store, self.directory = directory_store, directory

    def known(self) -> bool:
        return self.directory_store.known(self.directory)

    def get(self, kind: str, rid: str) -> dict | None:
        record = self.directory_store.entry(self.directory, rid)
        return record if record is not None and record["kind"] == kind else None

    def count(self, kind: str) -> int:
        return self.directory_store.count_kind(self.directory, kind)

    def page(self, kind: str, offset: int, limit: int) -> list[dict]:
        return self.directory_store.page(self.directory, kind, offset, limit)

    def scan(self, kind: str, after_id: str, limit: int) -> list[dict]:
        return self.directory_store.after(self.directory, kind, after_id, limit)

    def lookup(self, kind: str, attr: str, value: str) -> list[dict]:
        """Candidates for ``attr eq value`` (attr lower-case) from an index."""
        if attr == "id":
            record = self.get(kind, value)
            return [record] if record else []
        if attr == "externalid":
            return self.directory_store.by_external_id(self.directory, kind, value)
        field = "username" if attr == "username" else "name"
        return self.directory_store.find_by_field(self.directory, kind, field, value)

    def external_ids(self, ids: list[str]) -> dict[str, str]:
        return self.directory_store.external_ids(self.directory, ids)

    def set_external_id(self, rid: str, value: str | None) -> None:
        self.directory_store.set_external_id(self.directory, rid, value)

    def members(self, record: dict) -> list[dict]:
        """A group's members as ``{id, kind, name}`` (DNs not synced are left out)."""
        return self.directory_store.member_entries(self.directory, record["id"])

    def dn_of(self, rid: str) -> str | None:
        record = self.directory_store.entry(self.directory, rid)
        return record["dn"] if record else None

    def store(self, record: dict) -> None:
        self.directory_store.put_provisioned(self.directory, record)

    def forget(self, rid: str) -> None:
        self.directory_store.drop_provisioned(self.directory, rid)


@dataclass
class _Named:
    """What a PATCH names explicitly: members added or removed, and ``active``."""

    added: set = field(default_factory=set)
    removed: set = field(default_factory=set)
    active: bool = False


_MEMBER_FILTER = re.compile(r'^members\[\s*value\s+eq\s+"([^"]*)"\s*\]$', re.IGNORECASE)


def _entra_member_removals(body: Any) -> Any:
    """Entra ID removes members as ``{"op": "Remove", "path": "members", "value":
    [{"value": id}]}``; RFC 7644 §3.5.2.2 selects what to remove by a filter in the path
    instead, and scim2-models refuses the value. Rewrite each to the RFC's form."""
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        return body
    operations = []
    for op in body["Operations"]:
        if (isinstance(op, dict) and str(op.get("op", "")).lower() == "remove"
                and str(op.get("path", "")).lower() == "members"
                and isinstance(op.get("value"), list) and op["value"]
                and all(isinstance(m, dict) and isinstance(m.get("value"), str)
                        and '"' not in m["value"] for m in op["value"])):
            operations += [{"op": "remove", "path": f'members[value eq "{m["value"]}"]'}
                           for m in op["value"]]
        else:
            operations.append(op)
    return {**body, "Operations": operations}


def _named_in_patch(patch) -> _Named:
    """Why: home's copy of an entry may trail the directory by one change (a sync record
    read before an earlier order landed). A PATCH diffed only against that copy could
    answer 200 without sending the order it asks for, so what it names is always sent."""
    named = _Named()
    for op in patch.operations or []:
        path = str(op.path) if op.path is not None else ""
        value = op.value
        if not path and isinstance(value, dict):
            named.active |= "active" in value
            members = value.get("members") if op.op.value == "add" else None
        elif path.lower() == "active":
            named.active = True
            members = None
        elif path.lower() == "members":
            members = value
        else:
            match = _MEMBER_FILTER.match(path)
            if match and op.op.value == "remove":
                named.removed.add(match.group(1))
            members = None
        ids = {m.get("value") for m in members or [] if isinstance(m, dict)} - {None}
        if op.op.value == "add":
            named.added |= ids
        elif op.op.value == "remove":
            named.removed |= ids
    return named


# ---------------------------------------------------------------- the service

class ScimService:
    """The handlers; one per mount, shared by all directories."""

    def __init__(self, directory_store, provision: Provision, authorize: Authorize) -> None:
        self.directory_store, self.provision, self.authorize = directory_store, provision, authorize

    # ---------------------------------------------------------- plumbing

    def routes(self) -> list[BaseRoute]:
        def route(path: str, handler, methods: list[str], scope_of) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._serve(request, handler, scope_of(request.method))
            return Route(path, endpoint, methods=methods)

        read = lambda method: READ  # noqa: E731
        by_method = lambda method: READ if method in ("GET", "HEAD") else WRITE  # noqa: E731
        return [
            route("/ServiceProviderConfig", self.service_provider_config, ["GET"], read),
            route("/ResourceTypes", self.resource_types, ["GET"], read),
            route("/ResourceTypes/{name}", self.resource_type, ["GET"], read),
            route("/Schemas", self.schemas, ["GET"], read),
            route("/Schemas/{name:path}", self.schema, ["GET"], read),
            route("/Users", self.users, ["GET", "POST"], by_method),
            route("/Users/{id}", self.user, ["GET", "PUT", "PATCH", "DELETE"], by_method),
            route("/Groups", self.groups, ["GET", "POST"], by_method),
            route("/Groups/{id}", self.group, ["GET", "PUT", "PATCH", "DELETE"], by_method),
        ]

    async def _serve(self, request: Request, handler, scope: str) -> Response:
        denied = await self.authorize(request, scope)
        if denied is not None:
            return denied
        try:
            view = DirectoryView(self.directory_store, request.path_params["directory"])
            if not view.known():
                raise ScimError(404, f"no directory {view.directory!r} is synced by this home; "
                                "check the directory id in the URL (tether-home directory status)")
            return await handler(request, view)
        except ScimError as exc:
            return exc.response()
        except SCIMException as exc:
            return _from_library(exc).response()
        except Exception:  # never a traceback to the client; the log has it
            log.exception("SCIM %s %s failed", request.method, request.url.path)
            return ScimError(500, "internal error in home's SCIM service; the operator "
                                  "finds the cause in home's log").response()

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise ScimError(400, "Content-Length is not a number", "invalidSyntax")
        if declared is not None and int(declared) > MAX_BODY:
            raise ScimError(413, f"request body above {MAX_BODY} bytes; send fewer members or "
                                 "attributes per request")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise ScimError(413, f"request body above {MAX_BODY} bytes; send fewer members "
                                     "or attributes per request")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ScimError(400, "the body is not JSON; send a SCIM resource as "
                                 "application/scim+json", "invalidSyntax") from None
        if not isinstance(body, dict):
            raise ScimError(400, "the body must be a JSON object", "invalidSyntax")
        return body

    @staticmethod
    def _location(request: Request, view: DirectoryView, endpoint: str, rid: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/scim/v2/{view.directory}/{endpoint}/{rid}"

    # ---------------------------------------------------------- discovery

    async def service_provider_config(self, request: Request, view: DirectoryView) -> Response:
        return _json(PROVIDER.config.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))

    async def resource_types(self, request: Request, view: DirectoryView) -> Response:
        items = [t.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
                 for t in PROVIDER.resource_types]
        return _json(_list(ResourceType, items, len(items), 1))

    async def resource_type(self, request: Request, view: DirectoryView) -> Response:
        name = request.path_params["name"]
        for t in PROVIDER.resource_types:
            if t.id == name:
                return _json(t.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))
        raise ScimError(404, f"no resource type {name!r}; there are User and Group")

    async def schemas(self, request: Request, view: DirectoryView) -> Response:
        items = [s.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE) for s in PROVIDER.schemas]
        return _json(_list(Schema, items, len(items), 1))

    async def schema(self, request: Request, view: DirectoryView) -> Response:
        name = request.path_params["name"]
        for s in PROVIDER.schemas:
            if s.id == name:
                return _json(s.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))
        raise ScimError(404, f"no schema {name!r}; GET /Schemas lists them")

    # ---------------------------------------------------------- reading

    def _render(self, request: Request, view: DirectoryView, kind: str,
                records: list[dict]) -> list[dict]:
        """SCIM JSON dicts of records (unvalidated: for matching and then output)."""
        ext = view.external_ids([r["id"] for r in records])
        out = []
        for r in records:
            if kind == "user":
                out.append(scim_map.user_resource(
                    r, ext.get(r["id"]), self._location(request, view, "Users", r["id"])))
            else:
                members = [{"value": m["id"], "display": m["name"],
                            "type": "User" if m["kind"] == "user" else "Group",
                            "$ref": self._location(request, view, "Users" if m["kind"] == "user"
                                                   else "Groups", m["id"])}
                           for m in view.members(r)]
                out.append(scim_map.group_resource(
                    r, ext.get(r["id"]), self._location(request, view, "Groups", r["id"]),
                    members))
        return out

    @staticmethod
    def _model(kind: str, resource: dict):
        """The scim2-models object of a rendered resource; a value the directory holds
        but SCIM refuses (an e-mail that is no address) is left out."""
        model = UserModel if kind == "user" else Group
        while True:
            try:
                return model.model_validate(resource)
            except ValidationError as exc:
                bad = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")} & set(resource)
                if not bad or bad & {"id", "userName", "displayName", "schemas"}:
                    raise
                resource = {k: v for k, v in resource.items() if k not in bad}

    @classmethod
    def _dump(cls, kind: str, resource: dict, params: ResponseParameters | None,
              ctx: Context = Context.RESOURCE_QUERY_RESPONSE) -> dict:
        return cls._model(kind, resource).model_dump(scim_ctx=ctx, response_parameters=params)

    async def _list(self, request: Request, view: DirectoryView, kind: str) -> Response:
        model = UserModel if kind == "user" else Group
        query = dict(request.query_params)
        if len(query.get("filter", "")) > MAX_FILTER:
            raise ScimError(400, f"filter longer than {MAX_FILTER} characters", "invalidFilter")
        try:
            search = SearchRequest[model].model_validate(query, scim_ctx=Context.SEARCH_REQUEST)
        except ValidationError as exc:
            raise _from_validation(exc, "bad query") from None
        if search.sort_by:
            raise ScimError(400, "sorting is not supported (ServiceProviderConfig sort)",
                            "invalidValue")
        start = max(1, search.start_index or 1)
        count = DEFAULT_COUNT if search.count is None else min(max(0, search.count), MAX_RESULTS)
        params = _params(model, search)
        if search.filter is None:
            total = view.count(kind)
            records = view.page(kind, start - 1, count) if count else []
            resources = self._render(request, view, kind, records)
        else:
            matched = await self._match(request, view, kind, search.filter.ast)
            total = len(matched)
            resources = matched[start - 1:start - 1 + count]
        items = [self._dump(kind, r, params) for r in resources]
        return _json(_list(model, items, total, start))

    async def _match(self, request: Request, view: DirectoryView, kind: str, ast) -> list[dict]:
        """Every resource of ``kind`` the filter matches, in id order."""
        hint = scim_filter.index_hint(ast)
        if hint is not None:
            records = sorted(view.lookup(kind, *hint), key=lambda r: r["id"])
            return [r for r in self._render(request, view, kind, records)
                    if scim_filter.matches(ast, r)]
        matched, after = [], ""
        while True:  # no index answers: scan in chunks, letting the event loop breathe
            records = view.scan(kind, after, SCAN_CHUNK)
            if not records:
                return matched
            after = records[-1]["id"]
            matched.extend(r for r in self._render(request, view, kind, records)
                           if scim_filter.matches(ast, r))
            await asyncio.sleep(0)

    async def _one(self, request: Request, view: DirectoryView, kind: str, rid: str,
                   params: ResponseParameters | None = None,
                   ctx: Context = Context.RESOURCE_QUERY_RESPONSE) -> dict:
        record = view.get(kind, rid)
        if record is None:
            raise ScimError(404, f"no {kind} with id {rid!r} in directory {view.directory!r}")
        return self._dump(kind, self._render(request, view, kind, [record])[0], params, ctx)

    # ---------------------------------------------------------- endpoints

    async def users(self, request: Request, view: DirectoryView) -> Response:
        if request.method == "POST":
            return await self._create_user(request, view)
        return await self._list(request, view, "user")

    async def groups(self, request: Request, view: DirectoryView) -> Response:
        if request.method == "POST":
            return await self._create_group(request, view)
        return await self._list(request, view, "group")

    async def user(self, request: Request, view: DirectoryView) -> Response:
        return await self._resource(request, view, "user")

    async def group(self, request: Request, view: DirectoryView) -> Response:
        return await self._resource(request, view, "group")

    async def _resource(self, request: Request, view: DirectoryView, kind: str) -> Response:
        rid = request.path_params["id"]
        model = UserModel if kind == "user" else Group
        if request.method == "GET":
            try:
                params = ResponseParameters[model].model_validate(dict(request.query_params))
            except ValidationError as exc:
                raise _from_validation(exc, "bad query") from None
            return _json(await self._one(request, view, kind, rid, params))
        if view.get(kind, rid) is None:
            raise ScimError(404, f"no {kind} with id {rid!r} in directory {view.directory!r}")
        if request.method == "DELETE":
            return await self._delete(view, kind, rid)
        body = await self._body(request)
        current = self._model(kind, await self._current(request, view, kind, rid))
        if request.method == "PUT":
            try:
                wanted = model.model_validate(body, scim_ctx=Context.RESOURCE_REPLACEMENT_REQUEST)
            except ValidationError as exc:
                raise _from_validation(exc, "bad resource") from None
            ctx = Context.RESOURCE_REPLACEMENT_RESPONSE
        else:
            try:
                patch = PatchOp[model].model_validate(_entra_member_removals(body),
                                                      scim_ctx=Context.RESOURCE_PATCH_REQUEST)
            except ValidationError as exc:
                raise _from_validation(exc, "bad PATCH") from None
            wanted = current.model_copy(deep=True)
            patch.patch(wanted)
            ctx = Context.RESOURCE_PATCH_RESPONSE
        named = _named_in_patch(patch) if request.method == "PATCH" else _Named()
        if kind == "user":
            await self._update_user(view, rid, current, wanted, put=request.method == "PUT",
                                    named=named)
        else:
            await self._update_group(view, rid, current, wanted, named=named)
        return _json(await self._one(request, view, kind, rid, ctx=ctx))

    async def _current(self, request: Request, view: DirectoryView, kind: str, rid: str) -> dict:
        record = view.get(kind, rid)
        return self._render(request, view, kind, [record])[0]

    # ---------------------------------------------------------- writing

    async def _order(self, view: DirectoryView, order: dict) -> dict:
        """Send one order; its result when done (the read-back entry stored), else raise."""
        order = {"id": f"scim-{uuid.uuid4()}", "read_back": True, **order}
        try:
            reply = await self.provision(view.directory, order)
        except Exception as exc:  # the path to home's router failed: nothing known
            log.warning("SCIM provision %s failed to reach the router: %s", order["op"], exc)
            raise ScimError(503, f"provisioning could not be routed ({type(exc).__name__}); "
                                 "retry later", headers={"Retry-After": RETRY_AFTER}) from None
        result = _outcome(reply, order)
        entry = result.get("entry")
        if entry is not None:
            view.store(entry)
        return result

    async def _create_user(self, request: Request, view: DirectoryView) -> Response:
        body = await self._body(request)
        try:
            user = UserModel.model_validate(body, scim_ctx=Context.RESOURCE_CREATION_REQUEST)
        except ValidationError as exc:
            raise _from_validation(exc, "bad user") from None
        if view.lookup("user", "username", user.user_name):
            raise ScimError(409, f"a user with userName {user.user_name!r} exists in directory "
                                 f"{view.directory!r}; GET /Users?filter=userName eq \"...\" "
                                 "finds it", "uniqueness")
        fields = {k: v for k, v in scim_map.user_fields(user).items() if v is not None}
        active = user.active is not False
        order = {"op": "create_user", "username": user.user_name, "attributes": fields,
                 "skip_unmapped": True, "enabled": active}
        if user.password:
            order["password"] = user.password
        result = await self._order(view, order)
        rid = self._created_id(result)
        if not active and result["entry"].get("disabled") is not True:
            await self._order(view, {"op": "disable_user", "dn": result["dn"]})
        if user.external_id is not None:
            view.set_external_id(rid, user.external_id)
        body = await self._one(request, view, "user", rid, ctx=Context.RESOURCE_CREATION_RESPONSE)
        return _json(body, 201, {"Location": body["meta"]["location"]})

    async def _create_group(self, request: Request, view: DirectoryView) -> Response:
        body = await self._body(request)
        try:
            group = Group.model_validate(body, scim_ctx=Context.RESOURCE_CREATION_REQUEST)
        except ValidationError as exc:
            raise _from_validation(exc, "bad group") from None
        if view.lookup("group", "displayname", group.display_name):
            raise ScimError(409, f"a group named {group.display_name!r} exists in directory "
                                 f"{view.directory!r}", "uniqueness")
        if len(group.members or []) > MAX_MEMBER_CHANGES:
            raise ScimError(400, f"{len(group.members)} members in one request; create the group "
                                 f"with at most {MAX_MEMBER_CHANGES} and add the rest with PATCH",
                            "invalidValue")
        members = self._member_dns(view, scim_map.group_member_ids(group))
        result = await self._order(view, {"op": "create_group", "group": group.display_name,
                                          "members": members})
        rid = self._created_id(result)
        if group.external_id is not None:
            view.set_external_id(rid, group.external_id)
        body = await self._one(request, view, "group", rid, ctx=Context.RESOURCE_CREATION_RESPONSE)
        return _json(body, 201, {"Location": body["meta"]["location"]})

    @staticmethod
    def _created_id(result: dict) -> str:
        entry = result.get("entry")
        if not entry:
            raise ScimError(502, f"the entry was created ({result.get('dn')}) but could not be "
                                 "read back; it appears after the next sync: GET it then "
                                 "(filter by userName or displayName) instead of re-sending")
        return entry["id"]

    def _member_dns(self, view: DirectoryView, ids: list[str]) -> list[str]:
        dns = []
        for rid in dict.fromkeys(ids):
            dn = view.dn_of(rid)
            if dn is None:
                raise ScimError(400, f"member {rid!r} is no user or group of directory "
                                     f"{view.directory!r}", "invalidValue")
            dns.append(dn)
        return dns

    async def _update_user(self, view: DirectoryView, rid: str, current, wanted,
                           put: bool, named: _Named) -> None:
        dn = view.dn_of(rid)
        if wanted.user_name and wanted.user_name != current.user_name:
            raise ScimError(400, "changing userName is not supported: it names the directory "
                                 "entry; create a new user instead", "mutability")
        before, after = scim_map.user_fields(current), scim_map.user_fields(wanted)
        formatted = (wanted.name.formatted if wanted.name else None,
                     current.name.formatted if current.name else None)
        if wanted.display_name == current.display_name and formatted[0] != formatted[1]:
            after["name"] = formatted[0]  # displayName and name.formatted are one field
        changed = {k: (v if v is not None else "") for k, v in after.items() if before.get(k) != v}
        if changed:
            await self._order(view, {"op": "update_user", "dn": dn, "attributes": changed,
                                     "skip_unmapped": True})
        if wanted.password:
            await self._order(view, {"op": "set_password", "dn": dn,
                                     "password": wanted.password})
        want_active = wanted.active if wanted.active is not None else (True if put else None)
        if want_active is not None and (want_active != current.active or named.active):
            await self._order(view, {"op": "enable_user" if want_active else "disable_user",
                                     "dn": dn})
        if wanted.external_id != current.external_id:
            view.set_external_id(rid, wanted.external_id)

    async def _update_group(self, view: DirectoryView, rid: str, current, wanted,
                            named: _Named) -> None:
        if wanted.display_name != current.display_name:
            raise ScimError(400, "renaming a group is not supported; create a new group",
                            "mutability")
        dn = view.dn_of(rid)
        before = set(scim_map.group_member_ids(current))
        after = set(scim_map.group_member_ids(wanted))
        if len(after ^ before) > MAX_MEMBER_CHANGES:
            raise ScimError(400, f"{len(after ^ before)} member changes in one request; send at "
                                 f"most {MAX_MEMBER_CHANGES} per request", "invalidValue")
        # members the request names get their order even when home's copy already agrees:
        # that copy may trail the directory by a change, and the orders are idempotent
        added = self._member_dns(view, sorted((after - before) | (named.added & after)))
        removed = self._member_dns(view, sorted((before - after) | (named.removed - after)))
        for member in added:
            await self._order(view, {"op": "add_member", "group_dn": dn, "member_dn": member})
        for member in removed:
            await self._order(view, {"op": "remove_member", "group_dn": dn, "member_dn": member})
        if wanted.external_id != current.external_id:
            view.set_external_id(rid, wanted.external_id)

    async def _delete(self, view: DirectoryView, kind: str, rid: str) -> Response:
        dn = view.dn_of(rid)
        if kind == "user":
            await self._order(view, {"op": "delete_user", "dn": dn})
        else:
            await self._order(view, {"op": "delete_group", "group_dn": dn})
        view.forget(rid)
        return Response(status_code=204)


#: LDAP result codes of a refused write -> (HTTP status, scimType)
_REFUSALS = {68: (409, "uniqueness"), 32: (404, None), 19: (400, "invalidValue"),
             21: (400, "invalidValue"), 65: (400, "invalidValue"), 67: (400, "mutability"),
             53: (400, "invalidValue"), 20: (409, "uniqueness"), 16: (400, "invalidValue"),
             17: (400, "invalidValue"), 64: (400, "invalidValue")}


def _outcome(reply: Any, order: dict) -> dict:
    """The agent's result of a done order; every other answer raises its SCIM error."""
    unknown = {"Retry-After": RETRY_AFTER}
    if not isinstance(reply, dict):
        raise ScimError(503, "home's provisioning did not answer; retry later", headers=unknown)
    if not reply.get("ok"):
        code, error = reply.get("code"), reply.get("error") or "provisioning refused"
        if code == "not_found":
            raise ScimError(404, error)
        if code in ("unavailable", "timeout", None):
            raise ScimError(503, f"{error} (nothing was written; retry later)", headers=unknown)
        raise ScimError(502, f"the connector refused the order: {error}")
    routed = reply.get("result") or {}
    result = routed.get("result") if isinstance(routed.get("result"), dict) else {}
    status = result.get("status")
    if result.get("outcome_unknown") or status not in ("done", "failed"):
        log.warning("SCIM order %s %s: outcome unknown: %s", order["id"], order["op"],
                    result.get("reason"))
        raise ScimError(503, f"the outcome of {order['op']} is unknown "
                             f"({result.get('reason', 'no answer')}); the request is safe to "
                             "retry", headers=unknown)
    if status == "done":
        return result
    reason = result.get("reason") or "refused"
    if result.get("code") == "bad_order":
        raise ScimError(400, reason, "invalidValue")
    if result.get("code") == "server_down":
        raise ScimError(503, f"{reason} (nothing was written; retry later)", headers=unknown)
    status_code, scim_type = _REFUSALS.get(result.get("server_code"), (502, None))
    raise ScimError(status_code, f"the directory refused {order['op']}: {reason}", scim_type)


def _params(model, search: SearchRequest) -> ResponseParameters | None:
    if not (search.attributes or search.excluded_attributes):
        return None
    return ResponseParameters[model](attributes=search.attributes,
                                     excluded_attributes=search.excluded_attributes)


def _list(model, items: list[dict], total: int, start: int) -> dict:
    """A ListResponse around resources already trimmed to the requested attributes."""
    return ListResponse[model](total_results=total, start_index=start,
                             items_per_page=len(items), resources=None).model_dump(
        scim_ctx=Context.SEARCH_RESPONSE) | {"Resources": items}


def scim_routes(*, directory_store, provision: Provision, authorize: Authorize) -> list[BaseRoute]:
    """The SCIM routes for ``Mount("/scim/v2/{directory}", routes=...)``.

    ``directory_store``: home's :class:`~tether.home.directorystore.DirectoryStore`;
    ``provision(directory, order)``: the control socket's ``provision`` answer;
    ``authorize(request, scope)``: None to go on, or the response to send as is.
    """
    return ScimService(directory_store, provision, authorize).routes()
