"""The read-only status page: one server-rendered HTML document, no script at all.

:func:`collect` builds the document from home's database, the running hub and
the identity store (what ``tether-home status`` and ``directory status`` show,
per connector and instance); :func:`render` turns it into HTML with every
value escaped. The page works in any browser without fetching anything.
"""

from __future__ import annotations

import html
import time

from tether.home import directories, status
from tether.home.directorystore import DirectoryStore
from tether.home.store import Store

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}.ok{color:#060}.bad{color:#a00}
.muted{color:#777}"""


def collect(store: Store, directory_store: DirectoryStore | None, live: dict,
            update_states: dict[str, str] | None = None) -> dict:
    """Per connector its instances (connection, sockets, version, addresses, self-check,
    update state: `updates.instance_states`), and per directory its sync state."""
    report = status.report(store, live)
    sockets: dict[str, list[dict]] = {}
    for row in report["sockets"]:
        if row.get("instance_id"):
            sockets.setdefault(row["instance_id"], []).append(
                {"index": row["socket_index"], "peer": row["peer"],
                 "connected_at": row["connected_at"], "home": live.get("addresses") or []})
    connectors = []
    for c in report["connectors"]:
        rows = []
        for n in report["instances"]:
            if n["connector"] != c["name"]:
                continue
            own = sockets.get(n["instance_id"], [])
            check = n.get("selfcheck") or {}
            network = check.get("network") if isinstance(check.get("network"), dict) else {}
            measured = check.get("measured") if isinstance(check.get("measured"), dict) else {}
            private = [a.get("address") for a in network.get("addresses") or []
                       if isinstance(a, dict) and a.get("address")]
            if not private and network.get("local_address"):
                private = [network["local_address"]]
            rows.append({
                "instance_id": n["instance_id"], "connected": bool(own),
                "connected_since": min((s["connected_at"] for s in own), default=None),
                "sockets": own, "last_seen": n["last_seen"], "version": n["agent_version"],
                "update_state": (update_states or {}).get(n["instance_id"], "-"), "private_addresses": private,
                "public_address": own[0]["peer"].rsplit(":", 1)[0] if own else None,
                "platform": measured.get("platform") or (n.get("machine") or {}).get("platform"),
                "selfcheck": check.get("verdict"), "config_version": n["config_version"],
                "config_status": n["config_status"]})
        connectors.append({"name": c["name"], "cluster": c["cluster"],
                           "config_version": c["config_version"], "instances": rows})
    return {"generated_at": time.time(), "home": {
                "addresses": live.get("addresses") or [], "sockets": live.get("sockets", 0),
                "uptime": live.get("uptime")},
            "connectors": connectors,
            "directories": directories.report(store, directory_store, live.get("directories"))}


def _e(value) -> str:
    if value is None or value == "" or value == []:
        return '<span class="muted">-</span>'
    if isinstance(value, list):
        return "<br>".join(html.escape(str(v)) for v in value)
    return html.escape(str(value))


def _when(stamp: float | None) -> str:
    if not stamp:
        return _e(None)
    return html.escape(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")


def sign_in(reason: str) -> str:
    """The form a browser uses to present a ``status:read`` token (kept in a cookie)."""
    return _page("tether home: sign in", (
        "<h1>tether home status</h1>"
        f'<p class="bad" id="reason">{html.escape(reason)}</p>'
        '<form method="post" action="/status/session">'
        '<label>API token with scope status:read: '
        '<input type="password" name="token" id="token" size="60" autocomplete="off">'
        '</label> <button type="submit" id="sign-in">Show status</button></form>'))


def render(doc: dict) -> str:
    home = doc["home"]
    parts = ["<h1>tether home status</h1>",
             f"<p>generated {_when(doc['generated_at'])}; agents' listener "
             f"{_e(home['addresses'])}; {_e(home['sockets'])} socket(s) open</p>",
             "<h2>Connectors and instances</h2>"]
    for c in doc["connectors"]:
        parts.append(f'<h3 class="connector" id="connector-{html.escape(c["name"])}">'
                     f'{_e(c["name"])} <span class="muted">cluster {_e(c["cluster"])}, '
                     f'configuration v{_e(c["config_version"])}</span></h3>')
        if not c["instances"]:
            parts.append('<p class="muted">no instance enrolled</p>')
            continue
        parts.append("<table><tr><th>instance</th><th>connected</th><th>since</th>"
                     "<th>home sockets</th><th>version</th><th>update</th>"
                     "<th>private address</th><th>public address</th><th>platform</th>"
                     "<th>self-check</th><th>last seen</th><th>configuration</th></tr>")
        for n in c["instances"]:
            state = ('<span class="ok">connected</span>' if n["connected"]
                     else '<span class="bad">not connected</span>')
            socks = [f"#{s['index']} from {s['peer']} to {', '.join(s['home'])}"
                     for s in n["sockets"]]
            parts.append(
                f'<tr class="instance" data-instance="{html.escape(n["instance_id"])}">'
                f"<td>{_e(n['instance_id'])}</td><td>{state}</td>"
                f"<td>{_when(n['connected_since'])}</td><td>{_e(socks)}</td>"
                f"<td>{_e(n['version'])}</td><td>{_e(n['update_state'])}</td>"
                f"<td>{_e(n['private_addresses'])}</td><td>{_e(n['public_address'])}</td>"
                f"<td>{_e(n['platform'])}</td><td>{_e(n['selfcheck'])}</td>"
                f"<td>{_when(n['last_seen'])}</td>"
                f"<td>v{_e(n['config_version'])} {_e(n['config_status'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Directories</h2>")
    if not doc["directories"]:
        parts.append('<p class="muted">no directory configured</p>')
    else:
        parts.append("<table><tr><th>directory</th><th>cluster / policy</th><th>leader</th>"
                     "<th>users</th><th>groups</th><th>last sync</th><th>last full sync</th>"
                     "<th>last error</th></tr>")
        for r in doc["directories"]:
            error = directories.error_line(r["error"]) if r.get("error") else None
            parts.append(
                f'<tr class="directory"><td>{_e(r["directory"])}</td>'
                f"<td>{_e(r['cluster'])} / {_e(r['policy'])}</td><td>{_e(r['leader'])}</td>"
                f"<td>{_e(r['users'])}</td><td>{_e(r['groups'])}</td>"
                f"<td>{_when(r.get('synced_at'))}</td><td>{_when(r.get('full_synced_at'))}</td>"
                f"<td>{_e(error)}</td></tr>")
        parts.append("</table>")
    return _page("tether home status", "".join(parts))
