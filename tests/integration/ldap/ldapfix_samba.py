"""Provision and start a real Samba AD DC in a temporary directory, on 127.0.0.1 only.

Why: AD behaviour (DirSync, objectGUID, userAccountControl, unicodePwd, bind
error "data" codes, nested groups via LDAP_MATCHING_RULE_IN_CHAIN, Microsoft
persistent search) can only be tested against an AD implementation. Samba's
LDAP ports are fixed (389/636), so slapd fixtures use high ports.
Needs Debian packages samba, samba-ad-provision, samba-dsdb-modules, samba-vfs-modules.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REALM = "TETHER.TEST"
DOMAIN = "TETHER"
BASE_DN = "DC=tether,DC=test"
ADMIN_PW = "Admin-Pass-1"
ADMIN_DN = f"CN=Administrator,CN=Users,{BASE_DN}"
LDAPS_PORT = 636


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(cmd: list[str], what: str, timeout: float = 300) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{(res.stdout + res.stderr)[-3000:]}")


@dataclass
class SambaDC:
    root: Path
    proc: subprocess.Popen | None = None

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "smb.conf"

    def start(self, timeout: float = 60) -> None:
        """Run samba in the foreground (single process model) and wait for LDAPS."""
        if _port_busy(LDAPS_PORT) or _port_busy(389):
            raise RuntimeError("127.0.0.1:389/636 are already in use: another Samba or slapd runs on the "
                               "standard ports; stop it (the tests' slapd uses high ports)")
        log = open(self.root / "samba.out", "ab")
        self.proc = subprocess.Popen(["samba", "-F", "--no-process-group", "-M", "single", "-s", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"samba exited ({self.proc.returncode}); see {self.root / 'samba.out'}")
            if _port_busy(LDAPS_PORT):
                return
            time.sleep(0.1)
        raise RuntimeError(f"samba did not listen on 636 within {timeout}s; see {self.root / 'samba.out'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def create_samba(root: Path, tls, preload: list[str] | None = None) -> SambaDC:
    """Provision a DC (no DNS, LDAP service only) using the test CA's certificate, and start it.

    ``preload``: arguments of ``samba_bulkload.py`` after SMB_CONF and SAM_LDB, run
    while the DC is still stopped (a directory too large to add over LDAP in time)."""
    if shutil.which("samba-tool") is None or not Path("/usr/share/samba/setup/ad-schema").exists():
        raise RuntimeError("Samba AD DC needs Debian packages samba, samba-ad-provision, "
                           "samba-dsdb-modules, samba-vfs-modules (apt-get install them)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "run").mkdir(exist_ok=True)  # its own pid file: another DC on this machine is no obstacle
    _run(["samba-tool", "domain", "provision", f"--realm={REALM}", f"--domain={DOMAIN}",
          "--server-role=dc", "--dns-backend=NONE", "--host-name=dc1", f"--adminpass={ADMIN_PW}",
          f"--targetdir={root}", "--option=interfaces = 127.0.0.1", "--option=bind interfaces only = yes",
          f"--option=tls keyfile = {tls.key_file}", f"--option=tls certfile = {tls.cert_file}",
          f"--option=tls cafile = {tls.ca_file}", f"--option=log file = {root}/log.%m",
          "--option=server services = ldap", f"--option=pid directory = {root}/run"],
         "samba-tool domain provision")
    _run(["samba-tool", "domain", "passwordsettings", "set", "-H", str(root / "private" / "sam.ldb"),
          "--account-lockout-threshold=3", "--account-lockout-duration=10",
          "--reset-account-lockout-after=10", "--complexity=off", "--min-pwd-age=0"],
         "samba-tool domain passwordsettings")
    if preload:
        loader = Path(__file__).with_name("samba_bulkload.py")
        # progress lines go to the terminal (pytest -s), not into a captured buffer
        done = subprocess.run(["/usr/bin/python3", str(loader), str(root / "etc" / "smb.conf"),
                               str(root / "private" / "sam.ldb"), *preload], timeout=3600)
        if done.returncode:
            raise RuntimeError(f"samba bulk load failed (exit {done.returncode}); see its output above")
    dc = SambaDC(root)
    dc.start()
    return dc

