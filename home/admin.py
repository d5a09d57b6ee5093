"""Administrative operations on a home state directory (what the CLI calls).

Each function does one operator action and returns plain data for the CLI to
print; none of them needs the server to run. Changes the running server must
act on (new configuration, revocation) are announced through
:mod:`tether.home.control` by the CLI afterwards.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from tether import configsig, sealing
from tether import protocol as p
from tether.home import directories, pki, updatekeys
from tether.home.directorystore import DirectoryStore
from tether.home.paths import StatePaths, StateError, write_private, write_public
from tether.home.store import Store, StoreError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
CREDENTIAL_FORMAT = "tether-image-credential"
CREDENTIAL_VERSION = 1


def check_name(kind: str, name: str) -> str:
    """Connector/cluster names end up in certificates and file names: keep them plain."""
    if not _NAME_RE.match(name):
        raise StoreError(f"{kind} name {name!r} must be 1-63 characters of a-z 0-9 _ . - "
                         "starting with a letter or digit")
    return name


def init(paths: StatePaths, names: list[str]) -> dict:
    """Create CA, server certificate, config-signing key and database (once)."""
    if paths.ca_key.exists() or paths.db.exists():
        raise StateError(f"{paths.root} is initialized already; use another --state "
                         "or remove the directory to start over (this destroys home's CA)")
    names = names or ["localhost", "127.0.0.1", "::1"]
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.root.chmod(0o700)
    ca_key, ca_cert = pki.create_ca()
    server_key, server = pki.issue_server(ca_key, ca_cert, names)
    signing = configsig.generate_signing_key()
    write_private(paths.ca_key, pki.key_pem(ca_key))
    write_public(paths.ca_cert, pki.cert_pem(ca_cert))
    write_private(paths.server_key, pki.key_pem(server_key))
    write_public(paths.server_cert, pki.cert_pem(server.cert))
    write_private(paths.config_key, configsig.private_key_pem(signing))
    write_public(paths.config_pub, configsig.public_key_pem(signing))
    updatekeys.ensure(paths)  # the update bundles' signing key and its CA (issue 14)
    store = Store.create(paths.db)
    try:
        store.add_cert(server.serial, "server", names[0], server.not_before, server.not_after)
    finally:
        store.close()
    return {"state": str(paths.root), "names": names, "ca_serial": pki.serial_hex(ca_cert),
            "server_serial": server.serial, "config_key_id": configsig.key_id(signing.public_key())}


def reissue_server_cert(paths: StatePaths, names: list[str]) -> dict:
    """New server key and certificate from home's CA (expiry, new host names).

    Agents keep working: they pin the CA, not the server certificate. The
    running server picks the new one up at its next start.
    """
    store = open_store(paths)
    try:
        if not names:
            old = pki.load_cert_pem(paths.server_cert.read_bytes())
            sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n.value) for n in sans]
        ca_key, ca_cert = load_ca(paths)
        key, issued = pki.issue_server(ca_key, ca_cert, names)
        write_private(paths.server_key, pki.key_pem(key))
        write_public(paths.server_cert, pki.cert_pem(issued.cert))
        store.add_cert(issued.serial, "server", names[0], issued.not_before, issued.not_after)
        return {"names": names, "serial": issued.serial, "not_after": issued.not_after}
    finally:
        store.close()


def open_store(paths: StatePaths) -> Store:
    """The database of an initialized state directory."""
    paths.require_initialized()
    return Store(paths.db)


def load_ca(paths: StatePaths):
    """Home's CA key and certificate."""
    return (pki.load_key_pem(paths.ca_key.read_bytes()),
            pki.load_cert_pem(paths.ca_cert.read_bytes()))


def create_connector(paths: StatePaths, name: str, cluster: str | None,
                     max_instances: int) -> dict:
    """A connector: the unit images are issued for and configuration applies to."""
    check_name("connector", name)
    cluster = check_name("cluster", cluster or name)
    _check_max_instances(max_instances)
    with contextlib.closing(open_store(paths)) as store:
        store.add_connector(name, cluster, max_instances)
        return store.connector(name)


def update_connector(paths: StatePaths, name: str, cluster: str | None,
                     max_instances: int | None) -> dict:
    """Change a connector's cluster or clone policy (applies to the next enrollment)."""
    if cluster is None and max_instances is None:
        raise StoreError("give --cluster and/or --max-instances to change")
    if cluster is not None:
        check_name("cluster", cluster)
    if max_instances is not None:
        _check_max_instances(max_instances)
    with contextlib.closing(open_store(paths)) as store:
        store.update_connector(name, cluster, max_instances)
        return store.connector(name)


def _check_max_instances(max_instances: int) -> None:
    if max_instances < 1:
        raise StoreError("--max-instances must be at least 1 (1 = an OVA, never cloned)")


def issue_image(paths: StatePaths, connector: str, out: Path, home_urls: list[str],
                max_instances: int | None = None) -> dict:
    """Write a per-image credential bundle (docs/CONTRACTS.md) to ``out``, mode 0600.

    ``max_instances`` overrides the connector's clone policy for this image
    (an AMI in an auto-scaling group: several; an OVA: 1).
    """
    if max_instances is not None and max_instances < 1:
        raise StoreError("--max-instances must be at least 1")
    for url in home_urls:
        if not url.startswith("wss://"):
            raise StoreError(f"--home-url {url!r} must be a wss:// URL (agents dial TLS only)")
    store = open_store(paths)
    try:
        store.connector(connector)
        ca_key, ca_cert = load_ca(paths)
        image_id = str(uuid.uuid4())
        key, issued = pki.issue_image(ca_key, ca_cert, image_id, connector)
        fingerprint = pki.spki_fingerprint(key.public_key())
        urls = home_urls or ["wss://home.tether.invalid:443/"]
        bundle = {
            "format": CREDENTIAL_FORMAT, "version": CREDENTIAL_VERSION,
            "image_id": image_id, "connector": connector, "home_urls": urls,
            "key_pem": pki.key_pem(key).decode("ascii"), "cert_pem": issued.pem,
            "ca_pem": pki.cert_pem(ca_cert).decode("ascii"),
            "fingerprint": fingerprint, "cert_serial": issued.serial,
            # the image's RAUC keyring: only this home's update CA (issue 14)
            "update_ca_pem": updatekeys.ensure(paths).ca_cert.read_text(),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_private(out, (json.dumps(bundle, indent=2) + "\n").encode("utf-8"))
        with store.transaction():
            store.add_cert(issued.serial, "image", f"image:{image_id}", issued.not_before,
                           issued.not_after, connector=connector, image_id=image_id)
            store.add_image(image_id, connector, fingerprint, issued.serial, urls,
                            max_instances)
        return {"image_id": image_id, "connector": connector, "out": str(out),
                "max_instances": max_instances,
                "fingerprint": fingerprint, "cert_serial": issued.serial, "home_urls": urls,
                "uncovered_urls": uncovered_urls(paths, urls)}
    finally:
        store.close()


def uncovered_urls(paths: StatePaths, urls: list[str]) -> list[str]:
    """URLs whose host home's server certificate does not name: agents verify the
    host name, so they would refuse those (unless first-boot settings override them)."""
    cert = pki.load_cert_pem(paths.server_cert.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return list(urls)
    names = {n.lower() for n in sans.get_values_for_type(x509.DNSName)}
    addresses = set(sans.get_values_for_type(x509.IPAddress))
    missing = []
    for url in urls:
        host = (urlsplit(url).hostname or "").lower()
        try:
            covered = ipaddress.ip_address(host) in addresses
        except ValueError:
            covered = host in names
        if not covered:
            missing.append(url)
    return missing


def set_config(paths: StatePaths, connector: str, file: Path) -> dict:
    """Store a new configuration version for a connector from a JSON file."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot read {file}: {exc.strerror}") from None
    except ValueError as exc:
        raise StoreError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise StoreError(f"{file} must hold a JSON object (the connector's configuration)")
    configsig.canonical_json(config)  # refuses NaN and the like before it is stored
    check_deliverable(paths, connector, config, file)
    store = open_store(paths)
    try:
        version = store.add_config(connector, config)
        return {"connector": connector, "version": version}
    finally:
        store.close()


def check_deliverable(paths: StatePaths, connector: str, config: dict, file: Path) -> None:
    """Refuse a configuration whose ``config.push`` would not fit in one frame.

    It is measured the way home sends it: secrets sealed (to a throwaway key of
    the same kind), signed, wrapped in a protocol message; a stored version that
    can never be delivered would leave every instance behind for good.
    """
    probe = sealing.public_key_text(sealing.generate_private_key())
    sealed = configsig.seal_secrets(config, lambda plain, aad: sealing.seal(probe, plain, aad))
    key = configsig.load_private_key(paths.config_key.read_bytes())
    document = configsig.sign_config(key, sealed, version=2**31 - 1, connector=connector,
                                     instance_id=str(uuid.uuid4()))
    message = p.Message(id=p.new_id(), kind=p.Kind.REQUEST, op=p.Op.CONFIG_PUSH,
                        ts=time.time(), body={"config": document})
    try:
        p.encode(message)
    except p.ProtocolError as exc:
        raise StoreError(f"{file} cannot be delivered to appliances: {exc.detail} (a "
                         f"configuration is sent in one message of at most "
                         f"{p.MAX_FRAME_BYTES // 1024} KiB with its secrets sealed); make it "
                         "smaller") from None


def show_config(paths: StatePaths, connector: str, version: int | None) -> dict:
    """A stored configuration version (newest by default) and the list of versions."""
    store = open_store(paths)
    try:
        store.connector(connector)
        row = store.config(connector, version)
        if row is None:
            what = f"version {version}" if version else "any configuration"
            raise StoreError(f"connector {connector!r} has no {what}; set one with "
                             f"`tether-home config set {connector} FILE`")
        return {"connector": connector, "version": row["version"], "created_at":
                row["created_at"], "versions": store.config_versions(connector),
                "config": row["config"]}
    finally:
        store.close()


def revoke(paths: StatePaths, serial: str | None = None, reason: str = "revoked by operator",
           *, instance_id: str | None = None, image_id: str | None = None) -> list[dict]:
    """Mark certificates revoked; the server refuses them from the next handshake on.

    By serial, or every unrevoked certificate of an instance, or an image's
    certificate (which stops new enrollments and re-enrollments of that image).
    """
    store = open_store(paths)
    try:
        serials = _serials_to_revoke(store, serial, instance_id, image_id)
        rows = [store.revoke_cert(s, reason) for s in serials]
        return [{"serial": r["serial"], "kind": r["kind"], "subject": r["subject"],
                 "revoked_at": r["revoked_at"]} for r in rows]
    finally:
        store.close()


def reset_instance(paths: StatePaths, instance_id: str,
                   reason: str = "instance reset by operator") -> dict:
    """Let an enrolled instance's machine enroll afresh (it lost its state).

    Revokes every certificate of the instance and forgets its key, so the next
    enrolment naming its machine is accepted with whatever keys it brings (and
    keeps the instance id, its configuration and its directory bookkeeping).
    Without a reset only a request signed by the instance's current key may
    re-key it (:mod:`tether.home.enroll`).
    """
    store = open_store(paths)
    try:
        row = store.instance(instance_id)
        if row is None:
            raise StoreError(f"no instance {instance_id}; `tether-home status` lists them")
        with store.transaction():
            serials = store.revoke_instance_certs(instance_id, [], reason)
            store.reset_instance(instance_id)
        return {"instance_id": instance_id, "machine": row["machine_fingerprint"],
                "image_id": row["image_id"], "revoked": serials}
    finally:
        store.close()


def _serials_to_revoke(store: Store, serial: str | None, instance_id: str | None,
                       image_id: str | None) -> list[str]:
    if sum(x is not None for x in (serial, instance_id, image_id)) != 1:
        raise StoreError("give exactly one of SERIAL, --instance ID or --image ID")
    if serial is not None:
        return [serial.lower().removeprefix("0x")]
    if instance_id is not None:
        if store.instance(instance_id) is None:
            raise StoreError(f"no instance {instance_id}; `tether-home status` lists them")
        return [c["serial"] for c in store.certs(kind="instance", instance_id=instance_id)
                if c["revoked_at"] is None]
    image = store.image(image_id)
    if image is None:
        raise StoreError(f"no image {image_id}; `tether-home status` lists them")
    return [image["cert_serial"]]


# ------------------------------------------------------------------ directories


def set_cluster(paths: StatePaths, name: str, policy: str, primary: str | None) -> dict:
    """Store a cluster's routing policy (the running server re-elects leaders)."""
    check_name("cluster", name)
    if primary is not None and policy != "failover":
        raise StoreError("--primary applies to the failover policy only")
    store = open_store(paths)
    try:
        return store.set_cluster_policy(name, policy, primary)
    finally:
        store.close()


def list_clusters(paths: StatePaths) -> list[dict]:
    store = open_store(paths)
    try:
        return store.clusters()
    finally:
        store.close()


def directory_report(paths: StatePaths, live: dict | None) -> list[dict]:
    """Per directory: connectors, policy, leader (when running), cursor, counts."""
    store = open_store(paths)
    directory_store = DirectoryStore.open_existing(paths.identity_db)
    try:
        return directories.report(store, directory_store, live)
    finally:
        store.close()
        if directory_store is not None:
            directory_store.close()


def export_csv(paths: StatePaths, directory: str, out: Path) -> dict:
    """Write a directory's synced users and groups as CSV (works with home stopped)."""
    store = open_store(paths)
    directory_store = DirectoryStore.open_existing(paths.identity_db)
    try:
        configured = directories.serving_map(store)
        seen = directory_store.directories() if directory_store is not None else []
        state = directory_store.status(directory) if directory in seen else {}
        if not state.get("synced_at"):
            known = sorted(set(configured) | set(seen))
            if directory in known:
                raise StoreError(f"directory {directory!r} has no synced snapshot yet; start "
                                 "home and a connector serving it, then check "
                                 "`tether-home directory status`")
            raise StoreError(f"unknown directory {directory!r}; known directories: "
                             f"{', '.join(known) or 'none (configure one with `config set`)'}")
        if not out.parent.is_dir():
            raise StoreError(f"directory {out.parent} does not exist; create it or choose "
                             "another --csv path")
        return directory_store.export_csv(directory, out)
    finally:
        store.close()
        if directory_store is not None:
            directory_store.close()
