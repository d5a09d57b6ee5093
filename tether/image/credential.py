"""The image credential: this image's own key and certificate from home.

Either an operator hands a bundle made by a real home (`--credential`), or
the build asks a home state directory for a new one through the
`tether-home` CLI (default images/.home/, created once, so `make image`
needs no arguments). Every build gets a new bundle: a new key pair, a new
certificate, a new image id. The bundle is checked against the format in
docs/CONTRACTS.md before anything is built with it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

from .errors import BuildError
from .proc import run

FORMAT = "tether-image-credential"
VERSION = 1
REQUIRED = ("image_id", "connector", "home_urls", "key_pem", "cert_pem", "ca_pem", "fingerprint", "cert_serial")
DEFAULT_CONNECTOR = "default"


def validate(bundle: dict, source: str) -> dict:
    """Raise BuildError naming every problem of `bundle`; return it unchanged."""
    problems = []
    if bundle.get("format") != FORMAT:
        problems.append(f"format is {bundle.get('format')!r}, expected {FORMAT!r}")
    if bundle.get("version") != VERSION:
        problems.append(f"version is {bundle.get('version')!r}, expected {VERSION}")
    problems += [f"'{key}' missing or empty" for key in REQUIRED if not bundle.get(key)]
    urls = bundle.get("home_urls")
    if urls and (not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith("wss://") for u in urls)):
        problems.append("home_urls must be a list of wss:// URLs")
    for key, marker in (("key_pem", "PRIVATE KEY"), ("cert_pem", "CERTIFICATE"), ("ca_pem", "CERTIFICATE")):
        if bundle.get(key) and marker not in bundle[key]:
            problems.append(f"{key} is not a PEM {marker.lower()}")
    if problems:
        raise BuildError(f"image credential {source} is not usable:\n    " + "\n    ".join(problems) +
                         "\n    make a new one with `tether-home image issue --state DIR --connector NAME --out FILE`")
    return bundle


def load(path: Path) -> dict:
    try:
        bundle = json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"credential {path} not found: give the file `tether-home image issue` wrote") from None
    except (OSError, ValueError) as exc:
        raise BuildError(f"credential {path} is not readable JSON ({exc})") from None
    if not isinstance(bundle, dict):
        raise BuildError(f"credential {path} is not a JSON object")
    return validate(bundle, str(path))


def _home_cli() -> list[str]:
    script = Path(sys.executable).with_name("tether-home")
    if script.exists():
        return [str(script)]
    found = shutil.which("tether-home")
    if found:
        return [found]
    return [sys.executable, "-m", "tether.home.cli"]


def _initialized(state: Path) -> bool:
    return (state / "ca.crt").is_file()


def ensure_home(state: Path, say=print) -> None:
    """Create the local home state (CA, database, connector 'default') once."""
    if _initialized(state):
        return
    say(f"no home state in {state}: creating one (tether-home init + connector create {DEFAULT_CONNECTOR})")
    cli = _home_cli()
    run(cli + ["init", "--state", str(state)], what=f"tether-home init --state {state}")
    run(cli + ["connector", "create", "--state", str(state), DEFAULT_CONNECTOR],
        what=f"tether-home connector create {DEFAULT_CONNECTOR}")


def issue(state: Path, out: Path, home_urls: list[str], connector: str = DEFAULT_CONNECTOR) -> dict:
    """Ask home for a new image credential; written to `out` with mode 0600."""
    cmd = _home_cli() + ["image", "issue", "--state", str(state), "--connector", connector, "--out", str(out)]
    for url in home_urls:
        cmd += ["--home-url", url]
    run(cmd, what=f"tether-home image issue (state {state})")
    return load(out)


def place(bundle_path: Path, work: Path) -> Path:
    """Copy an operator's bundle into the build's work dir, mode 0600."""
    dest = work / "credential.json"
    shutil.copyfile(bundle_path, dest)
    os.chmod(dest, stat.S_IRUSR | stat.S_IWUSR)
    return dest
