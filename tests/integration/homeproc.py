"""Start and stop a real ``tether-home serve`` process on 127.0.0.1 for tests.

Usage (pytest fixture or plain code)::

    from tests.integration.homeproc import HomeProcess   # or: from homeproc import ...

    with HomeProcess.start(tmp_path, connector="acme", max_instances=1) as home:
        bundle = home.issue_image()            # dict: the credential bundle
        home.url                               # "wss://127.0.0.1:PORT/"
        home.cli("status", "--json")           # CompletedProcess of tether-home
        home.status()                          # parsed status --json
        home.restart()                         # same state dir, same port
    # leaving the block stops the server (SIGTERM, then SIGKILL) by PID

The server listens on port 0 (the kernel picks a free port, no race); the
bound port is read back through home's control socket, which is also how
"listening" is detected. Server logs go to ``<tmp>/home.log``
(:meth:`HomeProcess.log_text`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tether.home import control

VENV_BIN = Path(sys.executable).parent
TETHER_HOME = str(VENV_BIN / "tether-home")
START_TIMEOUT = 30.0


@dataclass
class HomeProcess:
    """A running home server with its own state directory."""

    root: Path
    state: Path
    connector: str
    port: int = 0
    proc: subprocess.Popen | None = None
    images: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------ creation

    @classmethod
    def start(cls, tmp: Path, connector: str = "acme", max_instances: int = 1,
              cluster: str | None = None, names: tuple[str, ...] = ("127.0.0.1", "localhost"),
              port: int = 0) -> "HomeProcess":
        """init + connector create + serve; returns once the server accepts."""
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        home = cls(root=tmp, state=tmp / "home-state", connector=connector, port=port)
        home.cli("init", *sum((["--name", n] for n in names), []))
        extra = ["--cluster", cluster] if cluster else []
        home.cli("connector", "create", connector, "--max-instances", str(max_instances), *extra)
        home.serve()
        return home

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``tether-home ARGS --state <state>``; raises with stderr when it fails."""
        command = [TETHER_HOME, *args, "--state", str(self.state)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    # -------------------------------------------------------------- server

    @property
    def log_path(self) -> Path:
        return self.root / "home.log"

    def serve(self) -> None:
        """Start ``serve`` (port 0 the first time, then the same port) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("home is already running")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [TETHER_HOME, "serve", "--state", str(self.state),
                 "--listen", f"127.0.0.1:{self.port}", "--log-level", "DEBUG"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tether-home serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            live = self.live()
            if live and live.get("pid") == self.proc.pid and live.get("addresses"):
                self.port = int(live["addresses"][0].rsplit(":", 1)[1])
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tether-home serve did not listen within {START_TIMEOUT:.0f} s:\n"
                           f"{self.log_text()[-4000:]}")

    def live(self) -> dict | None:
        """The running server's own figures (control socket), None if down."""
        try:
            return control.call(self.state / "control.sock", {"cmd": "live"}, timeout=5)
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL — only our own process, by PID."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """Hard stop (crash simulation): SIGKILL by PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        """Stop and serve again on the same port with the same state."""
        self.stop()
        self.serve()

    def __enter__(self) -> "HomeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------- helpers

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"

    @property
    def ca_cert(self) -> Path:
        return self.state / "ca.crt"

    def issue_image(self, connector: str | None = None, urls: list[str] | None = None) -> dict:
        """``image issue``; returns the bundle (also kept in ``self.images``)."""
        out = self.root / f"image-{len(self.images)}.json"
        args = ["image", "issue", "--connector", connector or self.connector, "--out", str(out)]
        for url in urls or [self.url]:
            args += ["--home-url", url]
        self.cli(*args)
        bundle = json.loads(out.read_text())
        bundle["path"] = str(out)
        self.images.append(bundle)
        return bundle

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def set_config(self, config: dict, connector: str | None = None) -> str:
        path = self.root / f"config-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        return self.cli("config", "set", connector or self.connector, str(path)).stdout

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
