"""``tether-home``: the control plane's command line.

Every command takes ``--state DIR`` (default ``/var/lib/tether-home``, or env
``TETHER_HOME_STATE``). Commands print a short confirmation on stdout; errors
go to stderr as one sentence saying what to do, with exit status 2 (usage or
state problem) or 1 (anything else).

Each sub-command's parser names the function that runs it (``set_defaults(run=...)``);
every such function takes the resolved state paths and the parsed arguments and
returns the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tether import __version__
from tether.home import admin, control, directories, logs, status
from tether.home.paths import StateError, resolve_state
from tether.home.pki import PkiError
from tether.home.sqlite import ENGINE_ERRORS
from tether.home.store import Store, StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-home",
                                     description="tether control plane: CA, enrollment, "
                                     "configuration and the server agents dial into")
    parser.add_argument("--version", action="version", version=f"tether-home {__version__}")
    state_help = "state directory (default $TETHER_HOME_STATE or /var/lib/tether-home)"
    parser.add_argument("--state", help=state_help)
    common = argparse.ArgumentParser(add_help=False)
    # Accepted after the command too; SUPPRESS keeps a value given before it.
    common.add_argument("--state", default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create CA, server cert, signing key")
    p.set_defaults(run=_init)
    p.add_argument("--name", action="append", default=[],
                   help="host name or IP agents use to reach home (repeatable)")

    p = sub.add_parser("server-cert", parents=[common],
                       help="re-issue home's TLS certificate (expiry, new host names)")
    p.set_defaults(run=_server_cert)
    p.add_argument("--name", action="append", default=[],
                   help="host name or IP (repeatable; default: the current names)")

    p = sub.add_parser("connector", parents=[common], help="manage connectors")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("create", parents=[common], help="create a connector")
    c.set_defaults(run=_connector_create)
    c.add_argument("name")
    c.add_argument("--cluster", help="cluster the connector serves (default: its name)")
    c.add_argument("--max-instances", type=int, default=1,
                   help="machines one image may run on (1 = an OVA; more for AMIs)")
    c = csub.add_parser("set", parents=[common], help="change a connector's cluster or policy")
    c.set_defaults(run=_connector_set)
    c.add_argument("name")
    c.add_argument("--cluster")
    c.add_argument("--max-instances", type=int)
    c = csub.add_parser("list", parents=[common], help="list connectors")
    c.set_defaults(run=_connector_list)

    p = sub.add_parser("image", parents=[common], help="image credentials")
    isub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = isub.add_parser("issue", parents=[common], help="write a per-image credential bundle")
    i.set_defaults(run=_image_issue)
    i.add_argument("--connector", required=True)
    i.add_argument("--out", required=True, type=Path)
    i.add_argument("--home-url", action="append", default=[],
                   help="wss:// URL the image dials (repeatable, tried in order)")
    i.add_argument("--max-instances", type=int,
                   help="machines this image may run on (default: the connector's setting)")

    p = sub.add_parser("serve", parents=[common], help="run the server")
    p.set_defaults(run=_serve)
    p.add_argument("--listen", default="0.0.0.0:443", help="HOST:PORT (default 0.0.0.0:443)")
    p.add_argument("--hello-timeout", type=float, default=30.0,
                   help="close sockets that do not say hello within this many seconds")
    p.add_argument("--max-sockets-per-agent", type=int, default=16,
                   help="sockets one enrolled instance may hold at once (default 16)")
    p.add_argument("--enroll-timeout", type=float, default=30.0,
                   help="close image-credential sockets after this many seconds (default 30)")
    p.add_argument("--max-image-sockets", type=int, default=64,
                   help="image-credential sockets at once, in all (default 64)")
    p.add_argument("--max-image-sockets-per-image", type=int, default=16,
                   help="image-credential sockets at once per image (default 16)")
    p.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="seconds for the TLS handshake and for the WebSocket upgrade (default 10)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--api-listen", metavar="HOST:PORT",
                   help="also serve the HTTPS API (OAuth2, authenticate, SCIM, metrics, status "
                   "page) here; default off; needs the `home` extra (pip install 'tether[home]')")
    p.add_argument("--api-issuer", metavar="URL",
                   help="the API's public https:// base URL (OAuth2 issuer and token audience; "
                   "default https://<first name of api.crt>:<port>)")

    p = sub.add_parser("status", parents=[common], help="connectors, images, instances")
    p.set_defaults(run=_status)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("config", parents=[common], help="connector configuration")
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = fsub.add_parser("set", parents=[common], help="store (and push) a new version")
    f.set_defaults(run=_config_set)
    f.add_argument("connector")
    f.add_argument("file", type=Path)
    f = fsub.add_parser("show", parents=[common], help="print a version (newest by default)")
    f.set_defaults(run=_config_show)
    f.add_argument("connector")
    f.add_argument("--version", type=int, dest="config_version")

    p = sub.add_parser("revoke", parents=[common], help="revoke an image or instance cert",
                       description="Revoke certificates; connections using them are closed "
                       "and refused. An instance can re-enroll with its image credential: "
                       "to retire an appliance for good, revoke its image (--image).")
    p.set_defaults(run=_revoke)
    p.add_argument("serial", nargs="?", help="hex serial (status --json shows them)")
    p.add_argument("--instance", help="revoke every certificate of this instance id")
    p.add_argument("--image", help="revoke this image's credential certificate")
    p.add_argument("--reason", default="revoked by operator")

    p = sub.add_parser("instance", parents=[common], help="enrolled instances")
    isub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = isub.add_parser("reset", parents=[common],
                        help="let an appliance that lost its state enroll afresh",
                        description="Revoke every certificate of the instance (its sockets "
                        "are closed) and forget its key: the next enrolment naming its machine "
                        "is accepted with new keys and keeps the instance id and configuration. "
                        "Without a reset only the instance itself (a request signed by its "
                        "current key) may re-key it; any other enrolment naming its machine is "
                        "refused as a clone.")
    i.set_defaults(run=_instance_reset)
    i.add_argument("instance_id")
    i.add_argument("--reason", default="instance reset by operator")
    _directory_parsers(sub, common)
    _api_parsers(sub, common)
    _update_parsers(sub, common)
    return parser


def _api_parsers(sub, common) -> None:
    """api-client, audit (issue 15)."""
    from tether.home.apistore import SCOPES

    p = sub.add_parser("api-client", parents=[common], help="clients of the HTTPS API")
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = asub.add_parser("create", parents=[common], help="create a client; prints its secret "
                        "once (OAuth2 client credentials: client_id = NAME)")
    a.set_defaults(run=_api_client_create)
    a.add_argument("name")
    a.add_argument("--scope", action="append", required=True, choices=SCOPES,
                   help="repeatable: " + ", ".join(SCOPES))
    a = asub.add_parser("list", parents=[common], help="clients, scopes, long-lived tokens")
    a.set_defaults(run=_api_client_list)
    a.add_argument("--tokens", action="store_true", help="also list each long-lived token")
    a = asub.add_parser("revoke", parents=[common], help="revoke a client (and all its tokens) "
                        "or one long-lived token; takes effect at once")
    a.set_defaults(run=_api_client_revoke)
    a.add_argument("name", nargs="?")
    a.add_argument("--token", dest="token_id", help="revoke only this token id")
    a = asub.add_parser("token", parents=[common], help="make a long-lived bearer token for "
                        "a client (for identity providers that take a static secret); printed once")
    a.set_defaults(run=_api_client_token)
    a.add_argument("name")

    p = sub.add_parser("audit", parents=[common], help="the API's audit log (who, what, when, "
                       "outcome); works with home stopped")
    p.set_defaults(run=_audit)
    p.add_argument("--client", help="only this client's calls")
    p.add_argument("--limit", type=int, default=100, help="newest N rows (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _update_parsers(sub, common) -> None:
    """update publish|rollout|status|pause|resume|abort (issue 14)."""
    p = sub.add_parser("update", parents=[common], help="whole-image updates of the appliances")
    usub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = usub.add_parser("publish", parents=[common],
                        help="check a .raucb bundle (signed by this home's update key, this product) "
                             "and keep it for rollouts")
    u.set_defaults(run=_update_publish)
    u.add_argument("bundle", type=Path)
    u = usub.add_parser("rollout", parents=[common], help="offer a published version to a connector")
    u.set_defaults(run=_update_rollout)
    u.add_argument("version")
    u.add_argument("--connector", required=True)
    u.add_argument("--canary", type=int, default=0,
                   help="update this many instances first, the rest after they committed")
    u.add_argument("--trial-deadline", type=int, default=300,
                   help="seconds a new slot's trial boot may take to check in before it is "
                        "rebooted (GRUB falls back after 3 tries; 60..3600, default 300)")
    u = usub.add_parser("status", parents=[common], help="bundles, rollouts, per-instance progress")
    u.set_defaults(run=_update_status)
    u.add_argument("--json", action="store_true")
    for action, what in (("pause", "offer nothing new (installs under way finish)"),
                         ("resume", "continue a paused rollout"),
                         ("abort", "stop the rollout for good")):
        u = usub.add_parser(action, parents=[common], help=what)
        u.set_defaults(run=_update_set_status)
        u.add_argument("--connector", required=True)


EXPORT_HELP = ("CSV, one row per user and group of the synced snapshot: columns kind (user|group), "
               "id (entryUUID/objectGUID), dn, then every mapped attribute field (sorted by "
               "name), disabled (true|false|empty), member_of (DNs of the groups listing the "
               "entry), members (a group's member DNs). Multi-valued cells are joined with '|'. "
               "Written to a temporary file (0600) and renamed into place. Works with home "
               "stopped.")


def _directory_parsers(sub, common) -> None:
    """cluster, authenticate, provision, export, directory (issue 5)."""
    p = sub.add_parser("cluster", parents=[common], help="cluster routing policies")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("set", parents=[common], help="set a cluster's routing policy",
                        description="failover: the primary connector serves (leads sync, "
                        "answers requests) while one of its instances is connected, others "
                        "only when none is; round-robin: requests rotate over the connected "
                        "instances and the sync leader stays while connected.")
    c.set_defaults(run=_cluster_set)
    c.add_argument("name")
    c.add_argument("--policy", required=True, choices=("failover", "round-robin"))
    c.add_argument("--primary", help="failover only: the primary connector (default: the "
                   "alphabetically first connector of the cluster)")
    c = csub.add_parser("list", parents=[common], help="list clusters and their policies")
    c.set_defaults(run=_cluster_list)

    p = sub.add_parser("authenticate", parents=[common],
                       help="check a user's password through a connector (server must run)",
                       description="Reads the password from stdin (or --password-file). "
                       "Exit 0: success; 1: any other outcome (wrong_password, disabled, "
                       "locked, expired, unknown_user); 2: error (home not running, unknown "
                       "directory, no connector connected).")
    p.set_defaults(run=_authenticate)
    p.add_argument("user")
    p.add_argument("--directory", required=True, help="directory id (as in the configuration)")
    p.add_argument("--password-file", type=Path, help="read the password from this file")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")

    p = sub.add_parser("provision", parents=[common],
                       help="send one provisioning order to a connector (never retried)")
    p.set_defaults(run=_provision)
    p.add_argument("--directory", required=True)
    p.add_argument("--order", required=True, type=Path,
                   help="JSON file: {\"id\", \"op\", ...} (agent/directory/provision.py)")

    p = sub.add_parser("export", parents=[common], help="write a directory's synced snapshot",
                       description=EXPORT_HELP)
    p.set_defaults(run=_export)
    p.add_argument("--directory", required=True)
    p.add_argument("--csv", required=True, type=Path, dest="csv_out", help="output file")

    p = sub.add_parser("directory", parents=[common], help="directory sync state")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("status", parents=[common],
                        help="leader, policy, cursor, counts, applied seqs per directory")
    d.set_defaults(run=_directory_status)
    d.add_argument("--json", action="store_true")


def _show(args, doc, render) -> int:
    """A report as JSON (``--json``, for scripts) or as ``render(doc)`` text for people."""
    if args.json:
        _print(doc)
    else:
        print(render(doc))
    return 0


def _print(doc: dict) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------ PKI and connectors

def _init(paths, args) -> int:
    doc = admin.init(paths, args.name)
    print(f"initialized {doc['state']} for {', '.join(doc['names'])}")
    return 0


def _server_cert(paths, args) -> int:
    doc = admin.reissue_server_cert(paths, args.name)
    print(f"server certificate {doc['serial']} for {', '.join(doc['names'])}; "
          "restart `tether-home serve` to use it")
    return 0


def _print_connector(row: dict) -> None:
    print(f"connector {row['name']} (cluster {row['cluster']}, "
          f"max-instances {row['max_instances']})")


def _connector_create(paths, args) -> int:
    _print_connector(admin.create_connector(paths, args.name, args.cluster, args.max_instances))
    return 0


def _connector_set(paths, args) -> int:
    row = admin.update_connector(paths, args.name, args.cluster, args.max_instances)
    if args.cluster is not None:
        control.call(paths.control_socket, {"cmd": "cluster-changed"})
    _print_connector(row)
    return 0


def _connector_list(paths, args) -> int:
    store = admin.open_store(paths)
    try:
        for row in store.connectors():
            print(f"{row['name']}\tcluster={row['cluster']}\t"
                  f"max-instances={row['max_instances']}")
    finally:
        store.close()
    return 0


def _image_issue(paths, args) -> int:
    doc = admin.issue_image(paths, args.connector, args.out, args.home_url, args.max_instances)
    print(f"image {doc['image_id']} for {doc['connector']} -> {doc['out']}")
    for url in doc["uncovered_urls"]:
        print(f"tether-home image issue: warning: home's server certificate does not name "
              f"the host of {url}; agents will refuse it unless first-boot settings give "
              "another URL (re-run init with --name for that host)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ configuration

def _config_set(paths, args) -> int:
    doc = admin.set_config(paths, args.connector, args.file)
    stored = f"{doc['connector']} configuration version {doc['version']}"
    try:
        reply = control.call(paths.control_socket, {"cmd": "config-changed",
                                                    "connector": args.connector})
    except control.ControlError as exc:
        raise control.ControlError(f"{stored} is stored, but {exc}") from None
    print(f"{stored}: {_push_report(reply)}")
    return 0


def _config_show(paths, args) -> int:
    _print(admin.show_config(paths, args.connector, args.config_version))
    return 0


def _push_report(reply: dict | None) -> str:
    """What ``config set``'s push did, per instance that did not take it."""
    if reply is None:
        return "home is not running; agents get it when they connect"
    if not reply.get("ok"):
        return f"stored, but the running home could not push it: {reply.get('error')}"
    parts = [f"pushed to {reply.get('pushed', 0)} connected instance(s)"]
    if reply.get("no_answer"):
        parts.append(f"no answer from {', '.join(reply['no_answer'])} (they get it when "
                     "they reconnect)")
    refused = reply.get("refused") or {}
    if refused:
        parts.append("refused by " + ", ".join(f"{iid} ({code})" for iid, code in
                                               refused.items()) +
                     " (`tether-home status` shows why)")
    return "; ".join(parts)


# ------------------------------------------------------------------ instances and certificates

def _instance_reset(paths, args) -> int:
    doc = admin.reset_instance(paths, args.instance_id, args.reason)
    closed = 0
    for serial in doc["revoked"]:
        reply = control.call(paths.control_socket, {"cmd": "revoked", "serial": serial})
        closed += reply.get("closed", 0) if reply else 0
    print(f"instance {doc['instance_id']} reset: revoked {len(doc['revoked'])} "
          f"certificate(s), closed {closed} socket(s); machine {doc['machine']} may now "
          "enroll afresh with the image credential")
    return 0


def _revoke(paths, args) -> int:
    docs = admin.revoke(paths, args.serial, args.reason, instance_id=args.instance,
                        image_id=args.image)
    if not docs:
        print("nothing to revoke: no unrevoked certificate matches")
    for doc in docs:
        reply = control.call(paths.control_socket, {"cmd": "revoked", "serial": doc["serial"]})
        closed = f", closed {reply.get('closed', 0)} socket(s)" if reply else ""
        print(f"revoked {doc['kind']} certificate {doc['serial']} ({doc['subject']}){closed}")
    return 0


# ------------------------------------------------------------------ serve and status

def _serve(paths, args) -> int:
    from tether.home import server  # websockets only needed here

    listen = server.parse_listen(args.listen)
    logs.setup(args.log_level, args.log_format)
    if min(args.hello_timeout, args.enroll_timeout, args.handshake_timeout) <= 0 \
            or min(args.max_sockets_per_agent, args.max_image_sockets,
                   args.max_image_sockets_per_image) < 1:
        raise ValueError("the --*-timeout options must be > 0 and the --max-* options >= 1")
    api_listen = server.parse_listen(args.api_listen) if args.api_listen else None
    if api_listen is not None:
        try:
            import tether.home.api.service  # noqa: F401  (fail before binding anything)
        except ImportError as exc:
            raise ValueError(f"--api-listen needs the `home` extra ({exc.name} is missing); "
                             "install it with pip install 'tether[home]'") from None
    server.serve(paths, listen, hello_timeout=args.hello_timeout,
                 max_sockets=args.max_sockets_per_agent, enroll_timeout=args.enroll_timeout,
                 max_image_sockets=args.max_image_sockets,
                 max_image_sockets_per_image=args.max_image_sockets_per_image,
                 handshake_timeout=args.handshake_timeout, api_listen=api_listen,
                 api_issuer=args.api_issuer)
    return 0


def _status(paths, args) -> int:
    paths.require_initialized()
    live = control.call(paths.control_socket, {"cmd": "live"}, timeout=10)
    store = Store(paths.db)
    try:
        doc = status.report(store, live)
    finally:
        store.close()
    doc["directories"] = admin.directory_report(paths, (live or {}).get("directories"))
    return _show(args, doc, status.render)


# ------------------------------------------------------------------ whole-image updates

def _update_publish(paths, args) -> int:
    from tether.home import updates

    doc = updates.publish(paths, args.bundle)
    print(f"published {doc['version']} ({doc['size']} bytes, sha256 {doc['sha256'][:16]}...)")
    return 0


def _update_status(paths, args) -> int:
    from tether.home import updates

    doc = updates.report(paths)
    return _show(args, doc, updates.render)


def _update_rollout(paths, args) -> int:
    from tether.home import updates

    row = updates.start_rollout(paths, args.version, args.connector, args.canary,
                                args.trial_deadline)
    return _rollout_changed(paths, args.connector, row)


#: ``update pause|resume|abort`` -> the rollout status it sets
ROLLOUT_STATUS = {"pause": "paused", "resume": "active", "abort": "aborted"}


def _update_set_status(paths, args) -> int:
    from tether.home import updates

    row = updates.set_status(paths, args.connector, ROLLOUT_STATUS[args.action])
    return _rollout_changed(paths, args.connector, row)


def _rollout_changed(paths, connector: str, row: dict) -> int:
    """Tell the running home that a connector's rollout changed, and say what it did."""
    reply = control.call(paths.control_socket, {"cmd": "update-changed",
                                                "connector": connector}, timeout=60)
    if reply is None:
        told = "home is not running; offers go out when agents connect"
    elif reply.get("ok"):
        told = f"offered now to {len(reply.get('offered') or [])} instance(s)"
    else:
        told = f"the running home could not act on it: {reply.get('error')}"
    print(f"rollout of {row['version']} to {row['connector']}: {row['status']}, "
          f"canary {row['canary']} ({told})")
    return 0


# ------------------------------------------------------------------ HTTPS API clients

@contextlib.contextmanager
def _api_store(paths) -> Iterator:
    """The API's client and audit store (``api.sqlite3``), closed after the command."""
    from tether.home.apistore import ApiStore

    paths.require_initialized()
    store = ApiStore(paths.api_db)
    try:
        yield store
    finally:
        store.close()


def _audit(paths, args) -> int:
    with _api_store(paths) as store:
        if args.limit < 1:
            raise ValueError("--limit must be at least 1")
        for row in store.audit_rows(limit=args.limit, client=args.client):
            if args.json:
                print(json.dumps(row, sort_keys=True))
                continue
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["at"]))
            print(f"{stamp} client={row['client'] or '-'} cred={row['credential'] or '-'} "
                  f"peer={row['peer'] or '-'} {row['method']} {row['path']} op={row['op']} "
                  f"status={row['status']} outcome={row['outcome']}"
                  + (f" detail={json.dumps(row['detail'])}" if row["detail"] else ""))
    return 0


def _api_client_create(paths, args) -> int:
    with _api_store(paths) as store:
        secret = store.create_client(args.name, args.scope)
    print(f"client_id: {args.name}\nclient_secret: {secret}\nscopes: "
          f"{' '.join(sorted(set(args.scope)))}")
    print("the secret is shown only now; home keeps a hash of it", file=sys.stderr)
    return 0


def _api_client_list(paths, args) -> int:
    with _api_store(paths) as store:
        for row in store.clients():
            state = "revoked" if row["revoked_at"] else "active"
            print(f"{row['name']}\t{state}\tscopes={','.join(row['scopes'])}\t"
                  f"tokens={row['tokens']}")
            if args.tokens:
                for tok in store.tokens(row["name"]):
                    print(f"  token {tok['token_id']}\t"
                          f"{'revoked' if tok['revoked_at'] else 'active'}")
    return 0


def _api_client_revoke(paths, args) -> int:
    with _api_store(paths) as store:
        if args.token_id:
            client = store.revoke_token(args.token_id)
            print(f"revoked token {args.token_id} of {client}")
        elif args.name:
            n = store.revoke_client(args.name)
            print(f"revoked client {args.name} and {n} token(s)")
        else:
            raise ValueError("give the client NAME, or --token ID")
    return 0


def _api_client_token(paths, args) -> int:
    with _api_store(paths) as store:
        token_id, token = store.create_token(args.name)
    print(token)
    print(f"token {token_id} for {args.name}: shown only now; revoke it with "
          f"`tether-home api-client revoke --token {token_id}`", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ directories

class CommandError(ValueError):
    """A directory command cannot be done (exit 2); the text says what to do."""


def _ask_server(paths, request: dict, timeout: float = 150.0) -> dict:
    """Send a directory request through the running server; errors become CommandError."""
    paths.require_initialized()
    reply = control.call(paths.control_socket, request, timeout=timeout)
    if reply is None:
        raise CommandError("home is not running; start it with `tether-home serve` (requests "
                           "go through a connector connected to it)")
    if not reply.get("ok"):
        code = reply.get("code")
        prefix = {"not_found": "unknown directory: ", "unavailable": "no connector available: "}
        raise CommandError(prefix.get(code, f"{code or 'failed'}: ") + str(reply.get("error")))
    return reply["result"]


def _read_password(args) -> str:
    if args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {args.password_file}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        import getpass

        text = getpass.getpass(f"password for {args.user}: ")
    else:
        text = sys.stdin.read()
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        # An empty password is an anonymous bind in LDAP: it would "succeed" for anyone.
        raise CommandError("empty password; give it on stdin or with --password-file")
    return password


def _cluster_set(paths, args) -> int:
    row = admin.set_cluster(paths, args.name, args.policy, args.primary)
    reply = control.call(paths.control_socket, {"cmd": "cluster-changed"})
    applied = "leaders re-elected" if reply else "home is not running; applies at start"
    primary = f", primary {row['primary']}" if row["policy"] == "failover" else ""
    print(f"cluster {row['name']}: {row['policy']}{primary} ({applied})")
    return 0


def _cluster_list(paths, args) -> int:
    for row in admin.list_clusters(paths):
        primary = f"\tprimary={row['primary']}" if row["policy"] == "failover" else ""
        default = "" if row["configured"] else "\t(default)"
        print(f"{row['name']}\tpolicy={row['policy']}{primary}\t"
              f"connectors={','.join(row['connectors']) or '-'}{default}")
    return 0


def _authenticate(paths, args) -> int:
    password = _read_password(args)
    result = _ask_server(paths, {"cmd": "authenticate", "directory": args.directory,
                                 "username": args.user, "password": password})
    if args.json:
        _print(result)
    else:
        print(f"outcome: {result.get('outcome') or ('success' if result.get('ok') else '?')}")
        print(f"dn: {result.get('dn') or '-'}")
        for dn in result.get("groups") or []:
            print(f"group: {dn}")
    return 0 if result.get("ok") and result.get("outcome", "success") == "success" else 1


def _provision(paths, args) -> int:
    try:
        order = json.loads(args.order.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"cannot read {args.order}: {exc.strerror}") from None
    except ValueError as exc:
        raise CommandError(f"{args.order} is not valid JSON: {exc}") from None
    if not isinstance(order, dict) or not isinstance(order.get("id"), str) \
            or not isinstance(order.get("op"), str):
        raise CommandError(f"{args.order} must hold an order object with string id and op")
    result = _ask_server(paths, {"cmd": "provision", "directory": args.directory,
                                 "order": order})
    _print(result)
    return 0 if result.get("ok") else 1


def _export(paths, args) -> int:
    doc = admin.export_csv(paths, args.directory, args.csv_out)
    print(f"{doc['directory']}: {doc['users']} user(s), {doc['groups']} group(s) -> "
          f"{doc['out']}")
    return 0


def _directory_status(paths, args) -> int:
    paths.require_initialized()
    live = control.call(paths.control_socket, {"cmd": "directories"}, timeout=10)
    rows = admin.directory_report(paths, (live or {}).get("directories"))
    return _show(args, {"running": live is not None, "directories": rows},
                 lambda doc: directories.render(doc["directories"], doc["running"]))


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one sentence on stderr, never a traceback."""
    args = _parser().parse_args(argv)
    try:
        return args.run(resolve_state(args.state), args)
    except (StateError, StoreError, PkiError, ValueError) as exc:
        print(f"tether-home {args.command}: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"tether-home {args.command}: {exc}; run as the user owning the state "
              "directory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the operator gets a sentence, not a traceback
        print(f"tether-home {args.command}: {_explain(exc, args)}", file=sys.stderr)
        return 1


def _explain(exc: BaseException, args: argparse.Namespace) -> str:
    """One sentence for a failure no command anticipated (disk, database, bug)."""
    text = str(exc) or type(exc).__name__
    state = resolve_state(args.state).root
    if isinstance(exc, ENGINE_ERRORS) or isinstance(exc, OSError) and \
            exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        return (f"home's state in {state} cannot be used ({text}); free space or fix the "
                "disk there, then retry (nothing was half-written: the database rolls back)")
    if isinstance(exc, OSError):
        return f"{text}; check {state} and the files the command names"
    return (f"unexpected {type(exc).__name__}: {text}; this is a bug in tether-home, "
            "please report it with the command line")


if __name__ == "__main__":
    sys.exit(main())
