"""The agent's start-up settings: paths, image identity, home URLs, proxy.

Sources, later ones winning (cloud-init's habit of ordered sources):

1. ``<etc>/agent.json`` baked into the image by the ``identity`` role
   (``image_id``, ``connector``, ``home_urls``, ``fingerprint``, ``cert_serial``);
2. ``/run/tether/firstboot.json`` written by the first-boot settings service from
   OVF properties or EC2 user data (``home_urls``, ``proxy``), optional.

The channel tuning (sockets, TTL, ping) has defaults here and can be changed by
the signed configuration home pushes (see :mod:`tether.agent.config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ETC = Path("/etc/tether")
DEFAULT_STATE = Path("/var/lib/tether")
DEFAULT_FIRSTBOOT = Path("/run/tether/firstboot.json")


class SettingsError(ValueError):
    """The agent's settings files are missing or wrong; the message says which."""


@dataclass
class Settings:
    etc_dir: Path
    state_dir: Path
    image_id: str
    connector: str
    home_urls: list[str]
    proxy: str | None = None
    sockets: int = 2
    ttl_s: float = 3600.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    sources: list[str] = field(default_factory=list)
    firstboot_path: Path | None = None  # reported home: refused first-boot values

    @property
    def image_key(self) -> Path:
        return self.etc_dir / "image.key"

    @property
    def image_cert(self) -> Path:
        return self.etc_dir / "image.crt"

    @property
    def ca_cert(self) -> Path:
        return self.etc_dir / "ca.crt"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{what} {path} is missing: the image was built without "
                            "its credential (role 'identity'), or pass --etc DIR") from None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{what} {path} is unreadable or not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{what} {path} must hold a JSON object")
    return data


def check_home_urls(urls: object, origin: str) -> list[str]:
    """A non-empty list of wss:// URLs, or a SettingsError naming ``origin``."""
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise SettingsError(f"{origin}: home_urls must be a non-empty list of wss:// URLs")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme != "wss" or not parts.hostname:
            raise SettingsError(f"{origin}: home URL {url!r} must look like wss://host[:port]/")
    return list(urls)


def check_proxy(proxy: object, origin: str) -> str | None:
    """``http://[user:password@]host:port`` or None."""
    if proxy in (None, ""):
        return None
    if not isinstance(proxy, str):
        raise SettingsError(f"{origin}: proxy must be a string like http://host:3128")
    parts = urlsplit(proxy)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{origin}: proxy {proxy!r} must look like "
                            "http://[user:password@]host:port")
    return proxy


def load(etc_dir: Path = DEFAULT_ETC, state_dir: Path = DEFAULT_STATE,
         firstboot: Path | None = DEFAULT_FIRSTBOOT) -> Settings:
    """Read agent.json and the optional first-boot overrides."""
    agent_json = etc_dir / "agent.json"
    base = _read_json(agent_json, "image settings")
    for key in ("image_id", "connector"):
        if not isinstance(base.get(key), str) or not base[key]:
            raise SettingsError(f"{agent_json}: '{key}' is missing")
    settings = Settings(
        etc_dir=etc_dir, state_dir=state_dir, image_id=base["image_id"],
        connector=base["connector"],
        home_urls=check_home_urls(base.get("home_urls"), str(agent_json)),
        proxy=check_proxy(base.get("proxy"), str(agent_json)),
        sources=[str(agent_json)],
    )
    if firstboot is not None and firstboot.exists():
        over = _read_json(firstboot, "first-boot settings")
        if "home_urls" in over:
            settings.home_urls = check_home_urls(over["home_urls"], str(firstboot))
        if "proxy" in over:
            settings.proxy = check_proxy(over["proxy"], str(firstboot))
        settings.sources.append(str(firstboot))
        settings.firstboot_path = firstboot
    return settings
