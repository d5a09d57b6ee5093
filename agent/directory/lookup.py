"""Ad-hoc search of users or groups for home (its `search` operation).

Why separate from sync: a search is bounded by the caller's limit and answered
at once; hitting that limit is a normal `truncated` answer, while a server
limit below it is the `size_limit` error.
"""

from __future__ import annotations

from . import ranges
from .config import DirectoryConfig, check_filter
from .connection import Pool, check_result
from .errors import DirectoryError
from .mapping import search_attributes, to_record

MAX_LIMIT = 10000


def search(config: DirectoryConfig, kind: str, extra_filter: str | None = None, limit: int = 100,
           pool: Pool | None = None) -> dict:
    """Users or groups matching the configured filter AND `extra_filter`, at most `limit`."""
    if kind not in ("user", "group"):
        raise DirectoryError("config", f"search kind must be 'user' or 'group', not {kind!r}")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise DirectoryError("config", f"search limit must be 1..{MAX_LIMIT}")
    base_filter = config.user_filter if kind == "user" else config.group_filter
    flt = f"(&{base_filter}{check_filter(extra_filter, 'filter')})" if extra_filter else base_filter
    conn = (pool or Pool(config)).connect()
    results: list[dict] = []
    truncated = False
    try:
        for base in config.base_dns:
            conn.search(base, flt, attributes=search_attributes(config, kind), size_limit=limit - len(results) + 1)
            res = conn.result or {}
            entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
            if res.get("result") == 4 and len(results) + len(entries) <= limit:
                check_result(conn, f"search of {kind}s")  # the server's own limit: an error
            elif res.get("result") not in (0, 4, 32):
                check_result(conn, f"search of {kind}s")
            for e in entries[:limit - len(results)]:  # after the checks: these reads replace conn.result
                if ranges.is_ranged(e):
                    ranges.complete(conn, e, config.member_range_size)
            for e in entries:
                if len(results) == limit:
                    truncated = True
                    break
                results.append(to_record(config, kind, e["dn"], e["raw_attributes"]))
            if truncated or res.get("result") == 4:
                truncated = True
                break
    finally:
        conn.unbind()
    return {"kind": kind, "results": results, "truncated": truncated}
