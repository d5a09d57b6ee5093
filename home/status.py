"""``tether-home status``: what home knows, from the database plus the live server.

The report is one dict (``--json`` prints it as is); :func:`render` turns it
into the operator's text view. Instance rows show the agent's last check-in,
version, self-check verdict and figures, the listening sockets the agent
reported for its own process (expected: none), and configuration state.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tether.home.store import Store

#: An instance not heard from for this long is shown as stale.
STALE_SECONDS = 120


def report(store: Store, live: dict | None) -> dict:
    """Build the status document."""
    now = time.time()
    # Socket rows are written by the running server; after a crash they describe nothing.
    sockets = store.sockets() if live else []
    per_instance: dict[str, int] = {}
    for row in sockets:
        if row["instance_id"]:
            per_instance[row["instance_id"]] = per_instance.get(row["instance_id"], 0) + 1
    instances = []
    for row in store.instances():
        serial = row["cert_serial"]
        cert = store.cert(serial) if serial else None
        instances.append({
            "instance_id": row["instance_id"], "connector": row["connector"],
            "image_id": row["image_id"], "machine": row["machine"],
            "enrolled_at": row["enrolled_at"], "last_seen": row["last_seen"],
            "seen_ago": None if row["last_seen"] is None else round(now - row["last_seen"], 1),
            "connected_sockets": per_instance.get(row["instance_id"], 0),
            "agent_version": row["agent_version"], "selfcheck": row["selfcheck"],
            "listening": row["listening"], "config_version": row["config_version"],
            "config_status": row["config_status"],
            # the version home pushed and the instance applied: what home trusts
            "config_confirmed": row.get("config_confirmed"), "cert_serial": serial,
            "cert_not_after": row["cert_not_after"],
            "cert_revoked": bool(cert and cert["revoked_at"]),
        })
    images = []
    for row in store.images():
        cert = store.cert(row["cert_serial"])
        images.append({**row, "instances": store.count_instances(row["image_id"]),
                       "revoked": bool(cert and cert["revoked_at"])})
    connectors = []
    for row in store.connectors():
        latest = store.config(row["name"])
        connectors.append({**row, "config_version": latest["version"] if latest else None})
    return {"server": live or {"running": False}, "connectors": connectors, "images": images,
            "instances": instances, "sockets": sockets, "clones": store.clones()}


def _confirmed(row: dict) -> str:
    """``, confirmed v2`` when the reported version is not the one home confirmed."""
    confirmed = row.get("config_confirmed")
    if confirmed == row.get("config_version"):
        return ""
    return f", confirmed v{confirmed}" if confirmed is not None else ", unconfirmed"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _figures(selfcheck: dict | None) -> str:
    """``ok vcpu=4 ram=8.0GiB disk=16.0GiB swap=4.0GiB free=...`` plus shortfalls."""
    if not selfcheck:
        return "no self-check yet"
    parts = [str(selfcheck.get("verdict", "?"))]
    measured = selfcheck.get("measured") or {}
    if isinstance(measured, dict):
        for key, value in measured.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                continue
            if key.endswith("_bytes") and isinstance(value, (int, float)):
                parts.append(f"{key[:-6]}={value / 2**30:.1f}GiB")
            else:
                parts.append(f"{key}={value}")
    for shortfall in (selfcheck.get("shortfalls") or [])[:6]:
        text = shortfall.get("message") if isinstance(shortfall, dict) else shortfall
        parts.append(f"[short: {text}]")
    return " ".join(parts)


def _expiry(not_after: float | None) -> str:
    """``20h left`` / ``expired 3h ago``: when the instance must have renewed."""
    if not not_after:
        return "-"
    left = not_after - time.time()
    return f"{left / 3600:.0f}h left" if left > 0 else f"expired {_ago(-left)}"


def render(doc: dict[str, Any]) -> str:
    """Human-readable status."""
    lines = []
    server = doc["server"]
    if server.get("running") is False:
        lines.append("server: not running (no control socket)")
    else:
        lines.append(f"server: running pid {server.get('pid')} on "
                     f"{', '.join(server.get('addresses', []))}, {server.get('sockets')} "
                     f"socket(s), up {server.get('uptime', 0):.0f}s, TLS refusals "
                     f"{sum(server.get('tls_refusals', {}).values())}, handshake time-outs "
                     f"{sum(server.get('handshake_timeouts', {}).values())}")
    lines.append(f"connectors ({len(doc['connectors'])}):")
    for c in doc["connectors"]:
        lines.append(f"  {c['name']}  cluster={c['cluster']} max-instances={c['max_instances']}"
                     f" config=v{c['config_version'] or '-'}")
    lines.append(f"images ({len(doc['images'])}):")
    for i in doc["images"]:
        limit = f"/{i['max_instances']}" if i.get("max_instances") else ""
        lines.append(f"  {i['image_id']}  connector={i['connector']} "
                     f"instances={i['instances']}{limit}"
                     f" serial={i['cert_serial']}{' REVOKED' if i['revoked'] else ''}")
    lines.append(f"instances ({len(doc['instances'])}):")
    for n in doc["instances"]:
        listening = n["listening"]
        lines.append(
            f"  {n['instance_id']}  connector={n['connector']} sockets={n['connected_sockets']}"
            f" seen={_ago(n['seen_ago'])} version={n['agent_version'] or '-'}"
            f" config=v{n['config_version'] or '-'}({n['config_status'] or '-'}"
            f"{_confirmed(n)})"
            f" listening={'unknown' if listening is None else len(listening)}"
            f" cert={_expiry(n.get('cert_not_after'))}"
            f"{' REVOKED' if n['cert_revoked'] else ''}")
        lines.append(f"      machine={(n['machine'] or {}).get('fingerprint')} "
                     f"selfcheck: {_figures(n['selfcheck'])}")
        if listening:  # an appliance must listen nowhere: show exactly what it reported
            lines.append("      LISTENING: " + ", ".join(json.dumps(x, sort_keys=True)
                                                         for x in listening[:8]))
    lines.append(f"flagged clones ({len(doc['clones'])}):")
    for c in doc["clones"]:
        lines.append(f"  image={c['image_id']} machine={c['machine_fingerprint']} "
                     f"attempts={c['attempts']} last={_ago(time.time() - c['last_seen'])}")
    return "\n".join(lines)
