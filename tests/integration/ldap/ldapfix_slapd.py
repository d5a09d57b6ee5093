"""Start a real OpenLDAP slapd from a temporary cn=config, on loopback high ports.

Why this shape: the directory engine must be tested against the real server
(mdb backend, syncprov + accesslog for incremental sync and notifications,
ppolicy for locked/expired accounts). The configuration is generated as LDIF,
loaded offline with `slapadd -n0`, the base data with `slapadd` too, so a fresh
server is up in well under a second and is also reused by bench/directory.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
SUFFIX = "dc=example,dc=com"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SVC_DN = f"cn=svc,{SUFFIX}"
LIMITED_DN = f"cn=limited,{SUFFIX}"
POLICY_DN = f"cn=default,ou=policies,{SUFFIX}"
ADMIN_PW = "admin-secret"
SVC_PW = "svc-secret"
LIMITED_PW = "limited-secret"


def free_port() -> int:
    """Ask the kernel for an unused loopback port (slapd binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssha(password: str, salt: bytes | None = None) -> str:
    """RFC 2307 {SSHA} value, as slapd stores hashed userPassword."""
    salt = salt if salt is not None else os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _schema_ldif() -> str:
    parts = []
    for name in SCHEMAS:
        text = Path(f"/etc/ldap/schema/{name}.ldif").read_text()
        parts.append("\n".join(l for l in text.splitlines() if not l.startswith("#")).strip())
    return "\n\n".join(parts)


def config_ldif(root: Path, tls, map_size: int) -> str:
    """The cn=config tree: modules, schema, accesslog db, main db with overlays."""
    tls_lines = ""
    if tls is not None:
        tls_lines = (f"olcTLSCACertificateFile: {tls.ca_file}\n"
                     f"olcTLSCertificateFile: {tls.cert_file}\n"
                     f"olcTLSCertificateKeyFile: {tls.key_file}\n")
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid
olcArgsFile: {root}/slapd.args
{tls_lines}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: syncprov
olcModuleLoad: accesslog
olcModuleLoad: ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{_schema_ldif()}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcSizeLimit: 500

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcRootDN: cn=config
olcRootPW: {ADMIN_PW}

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: cn=accesslog
olcDbDirectory: {root}/accesslog
olcDbMaxSize: {map_size}
olcRootDN: {ADMIN_DN}
olcDbIndex: objectClass,entryCSN,reqStart,reqEnd,reqResult eq
olcAccess: to * by dn.exact="{SVC_DN}" read by dn.exact="{LIMITED_DN}" read by * none
olcLimits: dn.exact="{SVC_DN}" size=unlimited time=unlimited

dn: olcOverlay={{0}}syncprov,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {{0}}syncprov
olcSpNoPresent: TRUE
olcSpReloadHint: TRUE

dn: olcDatabase={{2}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{2}}mdb
olcSuffix: {SUFFIX}
olcDbDirectory: {root}/data
olcDbMaxSize: {map_size}
olcRootDN: {ADMIN_DN}
olcRootPW: {ADMIN_PW}
olcDbIndex: objectClass,entryUUID,entryCSN eq
olcDbIndex: uid,cn,mail,member,memberUid eq
olcAccess: to attrs=userPassword by dn.exact="{SVC_DN}" manage by self write by anonymous auth by * none
olcAccess: to * by dn.exact="{SVC_DN}" manage by users read by * none
olcLimits: dn.exact="{SVC_DN}" size=unlimited time=unlimited
olcLimits: dn.exact="{LIMITED_DN}" size.soft=5 size.hard=5 size.prtotal=5

dn: olcOverlay={{0}}syncprov,olcDatabase={{2}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {{0}}syncprov
olcSpCheckpoint: 100 10

dn: olcOverlay={{1}}accesslog,olcDatabase={{2}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcAccessLogConfig
olcOverlay: {{1}}accesslog
olcAccessLogDB: cn=accesslog
olcAccessLogOps: writes
olcAccessLogSuccess: TRUE
olcAccessLogPurge: 07+00:00 01+00:00

dn: olcOverlay={{2}}ppolicy,olcDatabase={{2}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{2}}ppolicy
olcPPolicyDefault: {POLICY_DN}
olcPPolicyUseLockout: TRUE
"""


def base_ldif() -> str:
    """Suffix, containers, service accounts and the default password policy."""
    return f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: ou=policies,{SUFFIX}
objectClass: organizationalUnit
ou: policies

dn: {SVC_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: svc
userPassword: {SVC_PW}

dn: {LIMITED_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: limited
userPassword: {LIMITED_PW}

dn: {POLICY_DN}
objectClass: pwdPolicy
objectClass: device
cn: default
pwdAttribute: userPassword
pwdMaxAge: 0
pwdLockout: TRUE
pwdMaxFailure: 5
pwdLockoutDuration: 600
"""


def user_ldif(uid: str, password: str | None = None, **extra) -> str:
    """One inetOrgPerson under ou=people (used by tests and the benchmark)."""
    lines = [f"dn: uid={uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson",
             f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", f"mail: {uid}@example.com"]
    if password is not None:
        lines.append(f"userPassword: {password}")
    for k, v in extra.items():
        for item in (v if isinstance(v, list) else [v]):
            lines.append(f"{k}: {item}")
    return "\n".join(lines) + "\n"


def group_ldif(cn: str, members: list[str]) -> str:
    """One groupOfNames under ou=groups with the given member DNs."""
    lines = [f"dn: cn={cn},ou=groups,{SUFFIX}", "objectClass: groupOfNames", f"cn: {cn}"]
    lines += [f"member: {m}" for m in members] or [f"member: {SVC_DN}"]
    return "\n".join(lines) + "\n"


@dataclass
class Slapd:
    """A running slapd; `stop()` ends it and removes its directory."""

    root: Path
    port: int
    tls_port: int
    tls: object
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.root / "slapd.log"

    @property
    def host(self) -> str:
        return "localhost"

    def start(self, timeout: float = 10.0) -> None:
        """Run slapd in the foreground (-d 0) and wait until it accepts connections."""
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-d", "0", "-F", str(self.root / "config"), "-h", urls],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited ({self.proc.returncode}); see {self.log}:\n"
                                   + self.log.read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"slapd did not listen on {self.port} within {timeout}s; see {self.log}")

    def stop(self) -> None:
        """End the slapd process this object started (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _slapadd(args: list[str], ldif: str | Path, quick: bool = False) -> None:
    cmd = [SLAPADD, *args] + (["-q"] if quick else [])
    if isinstance(ldif, Path):
        cmd += ["-l", str(ldif)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    else:
        res = subprocess.run(cmd, input=ldif, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-3000:]}")


def create_slapd(root: Path, tls, data_ldif: str | Path | None = None,
                 map_size: int = 1 << 30, start: bool = True) -> Slapd:
    """Build config + data offline in `root` with slapadd and (optionally) start slapd."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("config", "data", "accesslog"):
        (root / d).mkdir(exist_ok=True)
    _slapadd(["-n0", "-F", str(root / "config")], config_ldif(root, tls, map_size))
    _slapadd(["-F", str(root / "config"), "-b", SUFFIX], base_ldif())
    if data_ldif is not None:
        _slapadd(["-F", str(root / "config"), "-b", SUFFIX], data_ldif, quick=True)
    server = Slapd(root=root, port=free_port(), tls_port=free_port(), tls=tls)
    if start:
        server.start()
    return server
