"""Between home's synced records and SCIM resources (RFC 7643), both ways.

A synced record carries the directory's mapped *fields* (``attribute_mapping`` of
its configuration: ``username``, ``name``, ``email``... see
agent/directory/config.py); this module is the one place that says which SCIM
attribute each field is. Records become plain SCIM JSON dicts (matched by
:mod:`tether.home.api.scim_filter`, then validated and trimmed by scim2-models);
a validated scim2-models ``User`` becomes the fields of a provisioning order.
Fields a directory does not map are dropped by the agent (``skip_unmapped``)
and named in the order's result.
"""

from __future__ import annotations

from typing import Any

from scim2_models import EnterpriseUser, Group, User

USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
#: record field -> enterprise extension attribute
ENTERPRISE_FIELDS = {"employee_number": "employeeNumber", "department": "department",
                     "organization": "organization", "cost_center": "costCenter",
                     "division": "division"}
#: the fields SCIM writes (a PUT clears those it leaves out)
USER_FIELDS = ("name", "given_name", "family_name", "email", "title", "phone",
               *ENTERPRISE_FIELDS)


def _one(value: Any) -> Any:
    """A field synced as a list (multi-valued attribute) shows its first value."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def user_resource(record: dict, external_id: str | None, location: str) -> dict:
    """SCIM JSON of a synced user record."""
    attrs = {k: _one(v) for k, v in (record.get("attributes") or {}).items()}
    out: dict[str, Any] = {"schemas": [USER_URN], "id": record["id"],
                           "userName": attrs.get("username") or record["dn"],
                           "meta": {"resourceType": "User", "location": location}}
    if external_id is not None:
        out["externalId"] = external_id
    if attrs.get("name"):
        out["displayName"] = attrs["name"]
    name = {k: v for k, v in (("formatted", attrs.get("name")),
                              ("givenName", attrs.get("given_name")),
                              ("familyName", attrs.get("family_name"))) if v}
    if name:
        out["name"] = name
    if attrs.get("email"):
        out["emails"] = [{"value": attrs["email"], "type": "work", "primary": True}]
    if attrs.get("phone"):
        out["phoneNumbers"] = [{"value": attrs["phone"], "type": "work", "primary": True}]
    if attrs.get("title"):
        out["title"] = attrs["title"]
    out["active"] = not record.get("disabled")
    enterprise = {scim: attrs[field] for field, scim in ENTERPRISE_FIELDS.items()
                  if attrs.get(field)}
    if enterprise:
        out["schemas"].append(ENTERPRISE_URN)
        out[ENTERPRISE_URN] = enterprise
    return out


def group_resource(record: dict, external_id: str | None, location: str,
                   members: list[dict]) -> dict:
    """SCIM JSON of a synced group; ``members`` already resolved to SCIM members."""
    attrs = record.get("attributes") or {}
    out: dict[str, Any] = {"schemas": [GROUP_URN], "id": record["id"],
                           "displayName": _one(attrs.get("name")) or record["dn"],
                           "meta": {"resourceType": "Group", "location": location}}
    if external_id is not None:
        out["externalId"] = external_id
    if members:
        out["members"] = members
    return out


def _primary(items) -> Any:
    items = [i for i in items or [] if getattr(i, "value", None)]
    if not items:
        return None
    return next((i for i in items if i.primary), items[0]).value


def user_fields(user: User) -> dict:
    """The record fields a SCIM user sets (every field of :data:`USER_FIELDS`,
    None where the resource has no value: a PUT clears it)."""
    name = user.name
    fields = {
        "name": user.display_name or (name.formatted if name else None)
        or (" ".join(p for p in (name.given_name, name.family_name) if p) if name else None)
        or None,
        "given_name": name.given_name if name else None,
        "family_name": name.family_name if name else None,
        "email": _primary(user.emails),
        "title": user.title,
        "phone": _primary(user.phone_numbers),
    }
    try:
        ext = user[EnterpriseUser]
    except (KeyError, TypeError):
        ext = None
    for field, scim in ENTERPRISE_FIELDS.items():
        value = getattr(ext, _snake(scim), None) if ext is not None else None
        fields[field] = value
    return {k: (str(v) if v is not None else None) for k, v in fields.items()}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def group_member_ids(group: Group) -> list[str]:
    return [m.value for m in group.members or [] if m.value]
