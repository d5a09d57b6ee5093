"""First-boot settings: where the appliance learns its network and home at power-on.

The operator has no console to type into, so settings come from the platform:

* vSphere, VMware Tools transport: the OVF environment document in the
  ``guestinfo.ovfEnv`` variable (read with open-vm-tools' ``vmware-rpctool``);
* vSphere, ISO transport: the same document as ``ovf-env.xml`` on a CD-ROM;
* AWS: EC2 user data (IMDSv2), a JSON object ``{"tether": {...}}``.

As in cloud-init (``DataSourceOVF``, ``DataSourceVMware``, ``DataSourceEc2``)
there is one class per place, tried in order, each turning its document into
the same normalized :class:`FirstBootSettings`. Validation happens once, in
:func:`normalize`: a value that does not parse is dropped with a reason,
a bad static network falls back to DHCP, and the rejected values travel on
(``rejected``) so the console can show them and the agent can report them home.

The OVF property keys are the ones the image's descriptor declares
(``tether.image.ovf.PROPERTIES``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

MAX_DOCUMENT = 1024 * 1024
OVF_ENV_NS = "http://schemas.dmtf.org/ovf/environment/1"
# OVF property key -> normalized setting name.
OVF_KEYS = {
    "hostname": "hostname",
    "network.mode": "mode",
    "network.address": "address",
    "network.prefix": "prefix",
    "network.gateway": "gateway",
    "network.dns": "dns",
    "network.ntp": "ntp",
    "proxy.url": "proxy",
    "home.url": "home_urls",
}
# Keys accepted inside EC2 user data's "tether" object (the normalized names,
# plus the singular home_url for convenience).
USER_DATA_KEYS = set(OVF_KEYS.values()) | {"home_url"}
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.I)


class DocumentError(ValueError):
    """A settings document that cannot be read at all (not XML / not JSON)."""


@dataclass(frozen=True)
class Rejected:
    """One value that was not used, and why."""

    key: str
    value: str
    reason: str


@dataclass
class FirstBootSettings:
    """Normalized first-boot settings, whatever their source."""

    source: str = "none"
    hostname: str | None = None
    mode: str = "dhcp"
    address: str | None = None
    prefix: int | None = None
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)
    ntp: list[str] = field(default_factory=list)
    proxy: str | None = None
    home_urls: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def messages(self) -> list[str]:
        """Console lines: one per rejected value, saying what happens instead."""
        return [f"tether first boot ({self.source}): ignored {r.key}={r.value!r}: {r.reason}"
                for r in self.rejected]

    def to_json(self) -> dict:
        """The /run/tether/firstboot.json document (see docs/CONTRACTS.md).

        Keys the agent reads (``home_urls``, ``proxy``) appear only when set,
        so an empty value never overrides the image's own agent.json.
        """
        network: dict = {"mode": self.mode}
        if self.mode == "static":
            network.update(address=self.address, prefix=self.prefix, gateway=self.gateway)
        doc = {"source": self.source, "hostname": self.hostname, "network": network,
               "dns": self.dns, "ntp": self.ntp,
               "rejected": [asdict(r) for r in self.rejected]}
        if self.proxy:
            doc["proxy"] = self.proxy
        if self.home_urls:
            doc["home_urls"] = self.home_urls
        return doc


# ------------------------------------------------------------ documents


def parse_ovf_environment(document: str | bytes) -> dict[str, str]:
    """Property key -> value from an OVF environment document (both transports)."""
    if len(document) > MAX_DOCUMENT:
        raise DocumentError(f"OVF environment is {len(document)} bytes, larger than expected")
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise DocumentError(f"OVF environment is not well-formed XML: {exc}") from None
    if root.tag != f"{{{OVF_ENV_NS}}}Environment":
        raise DocumentError(f"not an OVF environment document (root {root.tag})")
    values = {}
    for prop in root.iter(f"{{{OVF_ENV_NS}}}Property"):
        key = prop.get(f"{{{OVF_ENV_NS}}}key")
        if key is not None:
            values[key] = prop.get(f"{{{OVF_ENV_NS}}}value", "")
    return values


def ovf_raw_settings(properties: dict[str, str]) -> dict[str, str]:
    """Map OVF property keys onto normalized setting names; unknown keys are ignored."""
    return {OVF_KEYS[k]: v for k, v in properties.items() if k in OVF_KEYS}


def parse_user_data(document: str | bytes) -> tuple[dict, list[Rejected]]:
    """The ``tether`` object of EC2 user data, and any keys that were not understood."""
    if len(document) > MAX_DOCUMENT:
        raise DocumentError("user data larger than expected")
    try:
        data = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DocumentError(f"user data is not JSON ({exc}); expected "
                            '{"tether": {"home_urls": [...], ...}}') from None
    if not isinstance(data, dict) or not isinstance(data.get("tether"), dict):
        raise DocumentError('user data JSON has no "tether" object')
    settings = data["tether"]
    unknown = [Rejected(k, _text(v), "unknown setting") for k, v in settings.items()
               if k not in USER_DATA_KEYS]
    raw = {k: v for k, v in settings.items() if k in USER_DATA_KEYS}
    if "home_url" in raw:
        raw["home_urls"] = _as_list(raw.get("home_urls")) + _as_list(raw.pop("home_url"))
    return raw, unknown


# ------------------------------------------------------------ validation


def normalize(raw: dict, source: str, rejected: Iterable[Rejected] = ()) -> FirstBootSettings:
    """Validate raw settings (strings or lists) into FirstBootSettings.

    Static addressing is all or nothing: if the mode, address, prefix or
    gateway is bad, the appliance uses DHCP rather than half a configuration.
    """
    out = FirstBootSettings(source=source, rejected=list(rejected))
    out.hostname = _checked(out, "hostname", raw.get("hostname"), _hostname)
    out.dns = [v for v in (_checked(out, "dns", item, _ip) for item in _as_list(raw.get("dns")))
               if v]
    out.ntp = [v for v in (_checked(out, "ntp", item, _host_or_ip)
                           for item in _as_list(raw.get("ntp"))) if v]
    out.proxy = _checked(out, "proxy", raw.get("proxy"), _proxy)
    out.home_urls = [v for v in (_checked(out, "home_urls", item, _home_url)
                                 for item in _as_list(raw.get("home_urls"))) if v]
    _network(out, raw)
    return out


def _network(out: FirstBootSettings, raw: dict) -> None:
    mode = _text(raw.get("mode")).strip().lower() or ("static" if raw.get("address") else "dhcp")
    if mode == "dhcp":
        # vSphere's form defaults to dhcp: an address typed in but left on
        # dhcp is most likely a forgotten switch, so say so instead of
        # dropping it silently.
        out.rejected += [Rejected(key, _text(raw[key]).strip(),
                                  "address mode is dhcp; set it to static to use this")
                         for key in ("address", "prefix", "gateway")
                         if _text(raw.get(key)).strip()]
        return
    before = len(out.rejected)
    if mode != "static":
        out.rejected.append(Rejected("mode", mode, "must be dhcp or static; using DHCP"))
        return
    address, prefix = _split_cidr(_text(raw.get("address")).strip(), _text(raw.get("prefix")))
    ip = _checked(out, "address", address, _ip, required="a static address is required")
    length = _checked(out, "prefix", prefix, lambda v: _prefix(v, ip),
                      required="a prefix or netmask is required") if ip else None
    gateway = _checked(out, "gateway", raw.get("gateway"), lambda v: _gateway(v, ip))
    if len(out.rejected) > before or ip is None or length is None:
        out.rejected[before:] = [replace(r, reason=r.reason + "; using DHCP")
                                 for r in out.rejected[before:]]
        return
    out.mode, out.address, out.prefix, out.gateway = "static", ip, int(length), gateway


def _checked(out: FirstBootSettings, key: str, value, check: Callable[[str], str],
             required: str | None = None):
    """Run `check` on a non-empty value; on failure record it as rejected and return None."""
    text = _text(value).strip()
    if not text:
        if required:
            out.rejected.append(Rejected(key, "", required))
        return None
    try:
        return check(text)
    except ValueError as exc:
        out.rejected.append(Rejected(key, text, str(exc)))
        return None


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


def _prefix(text: str, address: str | None) -> str:
    """Prefix length ("24", "/24") or IPv4 netmask ("255.255.255.0") -> "24"."""
    version = ipaddress.ip_address(address).version if address else 4
    limit = 32 if version == 4 else 128
    text = text.lstrip("/")
    if text.isdigit():
        if not 1 <= int(text) <= limit:
            raise ValueError(f"prefix must be 1..{limit} for IPv{version}")
        return text
    if version == 4:
        try:
            return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen)
        except ValueError:
            pass
    raise ValueError(f"neither a prefix length (1..{limit}) nor a netmask")


def _gateway(text: str, address: str | None) -> str:
    gateway = _ip(text)
    if address and ipaddress.ip_address(gateway).version != ipaddress.ip_address(address).version:
        raise ValueError("gateway and address are not the same IP version")
    return gateway


def _hostname(text: str) -> str:
    name = text.rstrip(".")
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError("not a valid host name (letters, digits, '-', dots; 63 per label)")
    return name.lower()


def _host_or_ip(text: str) -> str:
    try:
        return _ip(text)
    except ValueError:
        return _hostname(text)


def _proxy(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be a URL with scheme, like http://proxy.example:3128")
    _port(parts)
    return text


def _home_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "wss" or not parts.hostname:
        raise ValueError("must be a wss:// URL, like wss://home.example.com/")
    _port(parts)
    return text


def _port(parts) -> None:
    try:
        parts.port
    except ValueError:
        raise ValueError("port is not a number in 1..65535") from None


def _split_cidr(address: str, prefix: str) -> tuple[str, str]:
    """Accept "192.0.2.10/24" in the address field when no separate prefix is given."""
    if "/" in address and not prefix.strip():
        address, _, prefix = address.partition("/")
    return address, prefix


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [_text(v) for v in value]
    return [part.strip() for part in re.split(r"[,\s]+", _text(value)) if part.strip()]


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------ data sources


class DataSource:
    """One place settings can come from. `fetch` returns the raw document or None."""

    name = "none"

    def fetch(self) -> str | bytes | None:
        raise NotImplementedError

    def parse(self, document: str | bytes) -> FirstBootSettings:
        raise NotImplementedError

    def get(self) -> FirstBootSettings | None:
        """Settings from this source; None when this platform does not offer it.

        A document that is present but unreadable yields default (DHCP)
        settings with the problem listed, rather than trying the next source.
        """
        document = self.fetch()
        if document is None:
            return None
        try:
            return self.parse(document)
        except DocumentError as exc:
            return FirstBootSettings(source=self.name,
                                     rejected=[Rejected("document", "", str(exc))])


class OvfDocumentSource(DataSource):
    """Shared parsing of the OVF environment for both vSphere transports."""

    def parse(self, document: str | bytes) -> FirstBootSettings:
        return normalize(ovf_raw_settings(parse_ovf_environment(document)), self.name)


class OvfGuestInfoSource(OvfDocumentSource):
    """vSphere `com.vmware.guestInfo` transport: guestinfo.ovfEnv via VMware Tools."""

    name = "ovf-guestinfo"

    def __init__(self, rpctool: str = "vmware-rpctool",
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.rpctool, self.run = rpctool, run

    def fetch(self) -> str | None:
        import shutil  # lazy: only the VMware Tools transport needs it

        if shutil.which(self.rpctool) is None and self.run is subprocess.run:
            return None
        try:
            proc = self.run([self.rpctool, "info-get guestinfo.ovfEnv"], capture_output=True,
                            text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (proc.stdout or "").strip()
        return text if proc.returncode == 0 and text else None


class OvfIsoSource(OvfDocumentSource):
    """vSphere `iso` transport: ovf-env.xml on the CD-ROM, mounted by the first-boot unit."""

    name = "ovf-iso"
    FILE_NAMES = ("ovf-env.xml", "ovf_env.xml", "OVF-ENV.XML", "OVF_ENV.XML")

    def __init__(self, mount_points: Iterable[Path] = (Path("/run/tether/ovfenv"),)):
        self.mount_points = [Path(p) for p in mount_points]

    def fetch(self) -> bytes | None:
        for directory in self.mount_points:
            for name in self.FILE_NAMES:
                path = directory / name
                if path.is_file():
                    return path.read_bytes()[: MAX_DOCUMENT + 1]
        return None


class Ec2UserDataSource(DataSource):
    """EC2 user data through IMDSv2 (session token first; IMDSv1 is disabled on launch)."""

    name = "ec2"

    def __init__(self, base_url: str = "http://169.254.169.254", timeout: float = 2.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def fetch(self) -> bytes | None:
        # urllib.request/urllib.error (http.client, email, ssl...) are imported here,
        # not at the top: the OVF path never needs them, and each import costs time
        # at every boot under emulation.
        import urllib.error

        try:
            token = self._request("PUT", "/latest/api/token",
                                  {"X-aws-ec2-metadata-token-ttl-seconds": "60"}).decode()
        except (OSError, urllib.error.URLError):
            return None  # no instance metadata service: not on EC2
        try:
            return self._request("GET", "/latest/user-data",
                                 {"X-aws-ec2-metadata-token": token})
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return b""  # on EC2, launched without user data
            return None
        except (OSError, urllib.error.URLError):
            return None

    def parse(self, document: str | bytes) -> FirstBootSettings:
        if not document.strip():
            return FirstBootSettings(source=self.name)
        raw, unknown = parse_user_data(document)
        return normalize(raw, self.name, unknown)

    def _request(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        import urllib.request  # lazy: see fetch

        request = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=self.timeout) as response:
            return response.read(MAX_DOCUMENT + 1)


def default_sources() -> list[DataSource]:
    """The order the appliance tries: VMware Tools, then the ISO, then EC2."""
    return [OvfGuestInfoSource(), OvfIsoSource(), Ec2UserDataSource()]


def detect(sources: Iterable[DataSource] | None = None) -> FirstBootSettings:
    """Settings from the first source that has some; DHCP defaults when none does."""
    for source in default_sources() if sources is None else sources:
        settings = source.get()
        if settings is not None:
            return settings
    return FirstBootSettings()
