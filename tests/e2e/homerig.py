"""A real tether-home for a booted image: the image's own home state, served on loopback.

The image build issued the image's credential from a home state directory
(images/.home by default). The boot test copies that state (the original
stays untouched, every run starts from the same database), gives the copy a
server certificate for the address the guest dials (the guestfwd address
inside qemu's user network, reached through the ISO transport's home.url),
and serves it on 127.0.0.1 with JSON logs, whose ``enrolled``, ``hello``
and ``clone_refused`` events carry the exact times and machines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from homeproc import TETHER_HOME, HomeProcess
from tether.home import admin, pki
from tether.home.paths import StatePaths, write_private, write_public

#: Names the image's home URL may carry besides the guestfwd address.
EXTRA_NAMES = ("home.tether.invalid", "localhost", "127.0.0.1")


class RigError(RuntimeError):
    """The home state cannot serve this image; the message says what to do."""


def copy_state(source: Path, dest: Path) -> Path:
    """Copy a home state directory, without a stale control socket."""
    if not (source / "ca.crt").is_file():
        raise RigError(f"{source} is not a tether-home state directory (no ca.crt): give the "
                       "state the image was built with (--home-state; default images/.home)")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("control.sock", "*.lock"))
    dest.chmod(0o700)
    return dest


def reissue_server_cert(state: Path, names: list[str]) -> str:
    """A new home server certificate for `names` from the state's own CA (its serial).

    What an operator does when home moves to a new address; agents pin the
    CA, not the server certificate, so the image's trust is unchanged.
    """
    paths = StatePaths(state)
    ca_key, ca_cert = admin.load_ca(paths)
    key, issued = pki.issue_server(ca_key, ca_cert, names)
    write_private(paths.server_key, pki.key_pem(key))
    write_public(paths.server_cert, pki.cert_pem(issued.cert))
    store = admin.open_store(paths)
    try:
        store.add_cert(issued.serial, "server", names[0], issued.not_before, issued.not_after)
    finally:
        store.close()
    return issued.serial


class BootHome(HomeProcess):
    """HomeProcess with JSON logs and event lookups."""

    def serve(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("home is already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [TETHER_HOME, "serve", "--state", str(self.state), "--listen",
                 f"127.0.0.1:{self.port}", "--log-level", "DEBUG", "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_listening()

    def events(self, name: str, **match) -> list[dict]:
        """Logged events called `name` whose fields equal `match`."""
        out = []
        for line in self.log_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name and all(doc.get(k) == v for k, v in match.items()):
                out.append(doc)
        return out

    def image(self, image_id: str) -> dict | None:
        return next((i for i in self.status()["images"] if i["image_id"] == image_id), None)

    def connector_row(self, name: str) -> dict | None:
        return next((c for c in self.status()["connectors"] if c["name"] == name), None)


def start_home(source_state: Path, tmp: Path, image_id: str, guest_address: str) -> BootHome:
    """Copy the image's home state, give it a certificate for `guest_address`, serve it."""
    state = copy_state(source_state, tmp / "home-state")
    reissue_server_cert(state, [guest_address, *EXTRA_NAMES])
    home = BootHome(root=tmp, state=state, connector="")
    image = None
    try:
        home.serve()
        image = home.image(image_id)
    finally:
        if image is None:
            home.stop()
    if image is None:
        raise RigError(f"home state {source_state} does not know image {image_id}: give the state "
                       "the image was built with (--home-state DIR)")
    home.connector = image["connector"]
    return home


def wait_event(home: BootHome, vm, name: str, timeout: float, **match) -> dict:
    """The first `name` event matching `match`, waiting while the VM runs."""
    found = vm.wait_for(lambda: home.events(name, **match), timeout,
                        f"home event {name} {match}", interval=1.0)
    return found[0]


def event_time(event: dict) -> float:
    return float(event["ts"])
