"""Evaluate a parsed SCIM filter (RFC 7644 §3.4.2.2) against a resource in its JSON form.

Why our own evaluator over scim2-models' parse tree: the library parses and
validates the filter (its grammar, its attribute names), but matching through
its models means building a pydantic object per entry; a filter that no index
answers is matched against every user of a 100,000-user store, so it runs on the
plain dicts :mod:`tether.home.api.scim_map` renders. :func:`index_hint` picks the
``eq`` term (``userName``, ``externalId``, ``id``, ``displayName``) that lets the
caller fetch a handful of candidates from an index instead of scanning.

Attribute names match case-insensitively; strings compare case-insensitively
except ``id`` and ``externalId`` (caseExact in RFC 7643).
"""

from __future__ import annotations

from typing import Any

from scim2_models.path.expressions import (AttrPath, Comparison, FilterNode, LogicalExpr,
                                           LogicalOperator, Not, Present, ValuePath)

CORE_URNS = ("urn:ietf:params:scim:schemas:core:2.0:user",
             "urn:ietf:params:scim:schemas:core:2.0:group")
CASE_EXACT = frozenset({"id", "externalid"})
#: attributes an index answers for ``eq``: the caller looks candidates up by them
INDEXED = frozenset({"username", "externalid", "id", "displayname"})


def _get(obj: dict, name: str) -> Any:
    if name in obj:
        return obj[name]
    low = name.lower()
    for key, value in obj.items():
        if key.lower() == low:
            return value
    return None


def _scope(resource: dict, path: AttrPath) -> dict | None:
    """The object an attribute path is read from (the extension's, when URN-qualified)."""
    if path.uri is None or path.uri.lower() in CORE_URNS:
        return resource
    ext = _get(resource, path.uri)
    return ext if isinstance(ext, dict) else None


def values(resource: dict, path: AttrPath) -> list:
    """Every leaf value a path names: one for a simple attribute, one per item for
    a multi-valued one (``emails`` alone means ``emails.value``)."""
    scope = _scope(resource, path)
    if scope is None:
        return []
    value = _get(scope, path.attr)
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = _get(item, path.sub_attr or "value")
        elif path.sub_attr:
            item = None
        if item is not None:
            out.append(item)
    return out


def _present(value: Any) -> bool:
    return value not in (None, "", [], {})


def _compare(op: str, actual: Any, wanted: Any, exact: bool) -> bool:
    if isinstance(actual, bool) or isinstance(wanted, bool):
        if op == "eq":
            return actual == wanted
        if op == "ne":
            return actual != wanted
        return False
    if isinstance(actual, str) and isinstance(wanted, str):
        if not exact:
            actual, wanted = actual.lower(), wanted.lower()
    elif wanted is None:
        return op == "ne"
    elif type(actual) is not type(wanted) and not (
            isinstance(actual, (int, float)) and isinstance(wanted, (int, float))):
        return op == "ne"
    try:
        if op == "eq":
            return actual == wanted
        if op == "ne":
            return actual != wanted
        if op == "co":
            return isinstance(actual, str) and wanted in actual
        if op == "sw":
            return isinstance(actual, str) and actual.startswith(wanted)
        if op == "ew":
            return isinstance(actual, str) and actual.endswith(wanted)
        if op == "gt":
            return actual > wanted
        if op == "ge":
            return actual >= wanted
        if op == "lt":
            return actual < wanted
        if op == "le":
            return actual <= wanted
    except TypeError:
        return False
    return False


def matches(node: FilterNode, resource: dict) -> bool:
    """Whether ``resource`` (SCIM JSON as a dict) satisfies the filter tree ``node``."""
    if isinstance(node, LogicalExpr):
        if node.op == LogicalOperator.and_:
            return all(matches(term, resource) for term in node.terms)
        return any(matches(term, resource) for term in node.terms)
    if isinstance(node, Not):
        return not matches(node.expr, resource)
    if isinstance(node, Present):
        return any(_present(v) for v in values(resource, node.attr_path))
    if isinstance(node, Comparison):
        op = node.op.value
        found = values(resource, node.attr_path)
        exact = node.attr_path.attr.lower() in CASE_EXACT and not node.attr_path.sub_attr
        if not found:
            return op == "ne" and node.value is not None
        if op == "ne":
            return all(_compare("ne", v, node.value, exact) for v in found)
        return any(_compare(op, v, node.value, exact) for v in found)
    if isinstance(node, ValuePath):
        scope = _scope(resource, node.attr_path)
        items = _get(scope, node.attr_path.attr) if scope is not None else None
        if not isinstance(items, list):
            items = [items] if isinstance(items, dict) else []
        return any(isinstance(item, dict) and matches(node.val_filter, item) for item in items)
    raise TypeError(f"unsupported filter node {type(node).__name__}")


def index_hint(node: FilterNode) -> tuple[str, str] | None:
    """``(attribute, value)`` of an ``eq`` term every match must satisfy, on an
    indexed attribute (lower-case name), or None: then the caller scans."""
    if isinstance(node, Comparison):
        path = node.attr_path
        if (node.op.value == "eq" and isinstance(node.value, str) and not path.sub_attr
                and path.attr.lower() in INDEXED and (path.uri is None
                                                      or path.uri.lower() in CORE_URNS)):
            return path.attr.lower(), node.value
        return None
    if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
        for term in node.terms:
            hint = index_hint(term)
            if hint is not None:
                return hint
    return None
