"""The directory store's snapshot as a CSV file (``tether-home directory export``).

Format (:func:`csv_columns`): one row per entry, multi-valued cells joined
with :data:`CSV_MULTI`, binary values base64 in a ``<field>;base64`` column.
The file holds personal data: written 0600, atomically.
"""

from __future__ import annotations

import base64
import csv
import os
from collections.abc import Iterable
from pathlib import Path

from tether.atomicfile import replacing
from tether.home.directorystore.records import dn_key

#: Separator of multi-valued cells in the CSV export (DNs contain commas, rarely "|").
CSV_MULTI = "|"


def write_csv(rows: list[dict], member_of: dict[str, list[str]], out: Path) -> dict:
    """Write decoded entries (``member_of``: entry id -> group DNs) to ``out`` as CSV."""
    fields = sorted({f for r in rows for f in r["attributes"]})
    base64_fields = {f for r in rows for f, enc in (r["encodings"] or {}).items()
                     if enc == "base64"}
    out = Path(out)
    with replacing(out, mode=0o600) as tmp:  # personal data
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(csv_columns(fields, base64_fields))
            for r in rows:
                writer.writerow(
                    [r["kind"], r["id"], r["dn"]]
                    + [_cell(_as_column(r, f, f in base64_fields)) for f in fields]
                    + [_cell(r["disabled"]),
                       _cell(sorted(member_of.get(r["id"], []), key=_sort_key)),
                       _cell(r["members"] if r["kind"] == "group" else None)])
            fh.flush()
            os.fsync(fh.fileno())
    users = sum(1 for r in rows if r["kind"] == "user")
    return {"out": str(out), "users": users, "groups": len(rows) - users, "fields": fields}


def _as_column(row: dict, field: str, base64_column: bool):
    """A field's value as its column says: in a ``;base64`` column, a row whose value is
    text (the field is base64 only in other rows, e.g. ``binary_in_text``) is base64 too."""
    value = row["attributes"].get(field)
    if not base64_column or value is None or (row["encodings"] or {}).get(field) == "base64":
        return value
    encode = lambda v: base64.b64encode(v.encode()).decode() if isinstance(v, str) else v  # noqa: E731
    return [encode(v) for v in value] if isinstance(value, list) else encode(value)


def _sort_key(dn: str) -> str:
    return dn_key(dn)[0]


def csv_columns(fields: Iterable[str], base64_fields: Iterable[str] = ()) -> list[str]:
    """``kind,id,dn,<mapped attribute fields, sorted>,disabled,member_of,members``; a field
    whose values are base64 (binary attributes) is headed ``<field>;base64``."""
    binary = set(base64_fields)
    return ["kind", "id", "dn", *(f"{f};base64" if f in binary else f for f in sorted(fields)),
            "disabled", "member_of", "members"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return CSV_MULTI.join(_cell(v) for v in value)
    return str(value)
