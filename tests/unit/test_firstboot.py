"""First-boot settings: OVF environment (guestinfo and ISO), EC2 user data, validation."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tether.agent import firstboot, machine
from tether.agent import firstboot_apply as fa
from tether.agent.settings import DEFAULT_FIRSTBOOT, check_home_urls, check_proxy
from tether.image import ami, ovf

# What vSphere puts into guestinfo.ovfEnv (and, minus the ve: adapter details,
# into ovf-env.xml on the ISO) for a VM deployed from the appliance OVA.
GUESTINFO_ENV = """<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-1042">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>6.5.0</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <PropertySection>
         <Property oe:key="home.url" oe:value="wss://home.corp.example:443/,wss://home2.corp.example/"/>
         <Property oe:key="hostname" oe:value="conn-a1.corp.example"/>
         <Property oe:key="image.id" oe:value="0b4c2a57-6a43-4d1e-9a0e-2f7c1d7f9a11"/>
         <Property oe:key="network.address" oe:value="10.20.30.40"/>
         <Property oe:key="network.dns" oe:value="10.20.0.53, 10.20.0.54"/>
         <Property oe:key="network.gateway" oe:value="10.20.30.1"/>
         <Property oe:key="network.mode" oe:value="static"/>
         <Property oe:key="network.ntp" oe:value="ntp1.corp.example,10.20.0.123"/>
         <Property oe:key="network.prefix" oe:value="255.255.255.0"/>
         <Property oe:key="proxy.url" oe:value="http://proxy.corp.example:3128"/>
   </PropertySection>
   <ve:EthernetAdapterSection>
      <ve:Adapter ve:mac="00:50:56:9a:3c:11" ve:network="VM Network" ve:unitNumber="7"/>
   </ve:EthernetAdapterSection>
</Environment>
"""

ISO_ENV = """<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" oe:id="">
   <PlatformSection><Kind>VMware ESXi</Kind><Version>7.0.3</Version></PlatformSection>
   <PropertySection>
         <Property oe:key="network.mode" oe:value="static"/>
         <Property oe:key="network.address" oe:value="192.0.2.10/26"/>
         <Property oe:key="network.prefix" oe:value=""/>
         <Property oe:key="network.gateway" oe:value="192.0.2.1"/>
         <Property oe:key="network.dns" oe:value="192.0.2.53"/>
         <Property oe:key="home.url" oe:value="wss://home.example/"/>
         <Property oe:key="proxy.url" oe:value=""/>
   </PropertySection>
</Environment>
"""


def _env(**props: str) -> str:
    lines = "".join(f'<Property oe:key="{k}" oe:value="{v}"/>' for k, v in props.items())
    return ('<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" '
            'xmlns:oe="http://schemas.dmtf.org/ovf/environment/1">'
            f"<PropertySection>{lines}</PropertySection></Environment>")


def _guestinfo(document: str | None, returncode: int = 0) -> firstboot.OvfGuestInfoSource:
    def run(cmd, **_):
        assert cmd == ["vmware-rpctool", "info-get guestinfo.ovfEnv"]
        return subprocess.CompletedProcess(cmd, returncode, stdout=document or "", stderr="")
    return firstboot.OvfGuestInfoSource(run=run)


def test_guestinfo_document_gives_static_network():
    settings = _guestinfo(GUESTINFO_ENV).get()
    assert settings.source == "ovf-guestinfo"
    assert settings.rejected == []
    assert settings.hostname == "conn-a1.corp.example"
    assert (settings.mode, settings.address, settings.prefix, settings.gateway) == (
        "static", "10.20.30.40", 24, "10.20.30.1")
    assert settings.dns == ["10.20.0.53", "10.20.0.54"]
    assert settings.ntp == ["ntp1.corp.example", "10.20.0.123"]
    assert settings.proxy == "http://proxy.corp.example:3128"
    assert settings.home_urls == ["wss://home.corp.example:443/", "wss://home2.corp.example/"]


def test_guestinfo_absent_or_tool_failing_means_not_this_platform():
    assert _guestinfo("", returncode=1).get() is None
    assert _guestinfo("").get() is None


def test_iso_transport_reads_the_same_document(tmp_path):
    (tmp_path / "ovf-env.xml").write_text(ISO_ENV)
    settings = firstboot.OvfIsoSource([tmp_path / "missing", tmp_path]).get()
    assert settings.source == "ovf-iso"
    assert (settings.mode, settings.address, settings.prefix) == ("static", "192.0.2.10", 26)
    assert settings.home_urls == ["wss://home.example/"]
    assert settings.proxy is None
    assert firstboot.OvfIsoSource([tmp_path / "missing"]).get() is None


def test_bad_values_are_rejected_and_network_falls_back_to_dhcp():
    settings = _guestinfo(_env(**{
        "network.mode": "static", "network.address": "10.0.0.300", "network.prefix": "40",
        "network.gateway": "10.0.0.1", "proxy.url": "proxy.corp.example:3128",
        "network.dns": "10.0.0.53,not-an-ip", "home.url": "https://home.example/"})).get()
    assert (settings.mode, settings.address, settings.prefix, settings.gateway) == (
        "dhcp", None, None, None)
    rejected = {r.key: r for r in settings.rejected}
    assert rejected["address"].value == "10.0.0.300"
    assert "using DHCP" in rejected["address"].reason
    assert rejected["proxy"].value == "proxy.corp.example:3128"
    assert "scheme" in rejected["proxy"].reason
    assert rejected["dns"].value == "not-an-ip"
    assert rejected["home_urls"].value == "https://home.example/"
    assert settings.dns == ["10.0.0.53"] and settings.proxy is None and settings.home_urls == []
    assert any("proxy.corp.example:3128" in line and "scheme" in line
               for line in settings.messages())


def test_prefix_of_40_is_rejected_for_ipv4_but_fine_for_ipv6():
    v4 = firstboot.normalize({"mode": "static", "address": "10.0.0.5", "prefix": "40"}, "t")
    assert v4.mode == "dhcp"
    (bad,) = v4.rejected
    assert (bad.key, bad.value) == ("prefix", "40")
    assert "1..32" in bad.reason and bad.reason.endswith("using DHCP")
    v6 = firstboot.normalize({"mode": "static", "address": "2001:db8::10", "prefix": "/40",
                              "gateway": "2001:db8::1"}, "t")
    assert (v6.mode, v6.prefix, v6.rejected) == ("static", 40, [])


@pytest.mark.parametrize("raw, reason", [
    ({"mode": "static"}, "static address is required"),
    ({"mode": "static", "address": "10.0.0.5"}, "prefix or netmask is required"),
    ({"mode": "static", "address": "10.0.0.5", "prefix": "255.0.255.0"}, "netmask"),
    ({"mode": "static", "address": "10.0.0.5", "prefix": "24", "gateway": "2001:db8::1"},
     "same IP version"),
    ({"mode": "bridge"}, "dhcp or static"),
])
def test_incomplete_static_network_falls_back(raw, reason):
    settings = firstboot.normalize(raw, "t")
    assert settings.mode == "dhcp" and settings.address is None
    assert any(reason in r.reason for r in settings.rejected), settings.rejected


def test_hostname_and_ntp_validation():
    settings = firstboot.normalize({"hostname": "-bad_host-", "ntp": "pool.ntp.org, bad_name!"},
                                   "t")
    assert settings.hostname is None and settings.ntp == ["pool.ntp.org"]
    assert {r.key for r in settings.rejected} == {"hostname", "ntp"}


def test_garbage_document_yields_dhcp_with_the_problem_listed():
    settings = _guestinfo("<Environment><unclosed").get()
    assert settings.mode == "dhcp"
    (problem,) = settings.rejected
    assert problem.key == "document" and "XML" in problem.reason


def test_ovf_keys_match_the_descriptor_properties():
    assert set(firstboot.OVF_KEYS) == {p.key for p in ovf.PROPERTIES}


# ------------------------------------------------------------ EC2 user data


class _Imds(BaseHTTPRequestHandler):
    """Loopback stand-in for the instance metadata service, IMDSv2 only."""

    user_data: bytes | None = None
    token = "tok-123"

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"):
            self.send_error(400)
            return
        self._reply(200, self.token.encode())

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self.send_error(401)
        elif self.path != "/latest/user-data" or self.user_data is None:
            self.send_error(404)
        else:
            self._reply(200, self.user_data)

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


@pytest.fixture
def imds():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _ec2(server) -> firstboot.Ec2UserDataSource:
    return firstboot.Ec2UserDataSource(f"http://127.0.0.1:{server.server_address[1]}")


def test_ec2_user_data_written_by_launch_is_understood(imds):
    settings_in = {"hostname": "conn-aws-1", "home_urls": ["wss://home.example:443/"],
                   "proxy": "http://10.0.0.8:3128", "dns": [], "ntp": ["169.254.169.123"]}
    _Imds.user_data = ami.user_data(settings_in).encode()
    settings = _ec2(imds).get()
    assert settings.source == "ec2" and settings.rejected == []
    assert settings.hostname == "conn-aws-1"
    assert settings.home_urls == ["wss://home.example:443/"]
    assert settings.proxy == "http://10.0.0.8:3128"
    assert settings.ntp == ["169.254.169.123"]
    assert settings.mode == "dhcp"


def test_ec2_without_user_data_is_dhcp_defaults(imds):
    _Imds.user_data = None
    settings = _ec2(imds).get()
    assert settings == firstboot.FirstBootSettings(source="ec2")


def test_ec2_user_data_not_ours(imds):
    _Imds.user_data = b"#cloud-config\npackages: [nginx]\n"
    settings = _ec2(imds).get()
    assert settings.mode == "dhcp"
    assert "not JSON" in settings.rejected[0].reason
    _Imds.user_data = json.dumps({"tether": {"home_url": "wss://h.example/", "colour": "red",
                                             "proxy": "ftp://x"}}).encode()
    settings = _ec2(imds).get()
    assert settings.home_urls == ["wss://h.example/"]
    assert {(r.key, r.value) for r in settings.rejected} == {("colour", "red"),
                                                             ("proxy", "ftp://x")}


def test_no_metadata_service_means_not_ec2():
    assert firstboot.Ec2UserDataSource("http://127.0.0.1:9", timeout=0.5).get() is None


# ------------------------------------------------------------ order and output


def test_sources_are_tried_in_order(tmp_path):
    (tmp_path / "ovf-env.xml").write_text(ISO_ENV)
    iso = firstboot.OvfIsoSource([tmp_path])
    assert firstboot.detect([_guestinfo(GUESTINFO_ENV), iso]).source == "ovf-guestinfo"
    assert firstboot.detect([_guestinfo(None, 1), iso]).source == "ovf-iso"
    assert firstboot.detect([_guestinfo(None, 1)]) == firstboot.FirstBootSettings()


def test_json_for_the_agent():
    settings = _guestinfo(GUESTINFO_ENV).get()
    doc = json.loads(json.dumps(settings.to_json()))
    assert check_home_urls(doc["home_urls"], "t") == settings.home_urls
    assert check_proxy(doc["proxy"], "t") == settings.proxy
    assert doc["network"] == {"mode": "static", "address": "10.20.30.40", "prefix": 24,
                              "gateway": "10.20.30.1"}
    empty = firstboot.FirstBootSettings(source="ec2").to_json()
    assert "home_urls" not in empty and "proxy" not in empty
    assert empty["network"] == {"mode": "dhcp"}


def test_address_left_on_dhcp_is_reported_not_used():
    settings = _guestinfo(_env(**{"network.mode": "dhcp", "network.address": "10.0.0.5",
                                  "network.prefix": "24"})).get()
    assert settings.mode == "dhcp" and settings.address is None
    assert {r.key for r in settings.rejected} == {"address", "prefix"}
    assert all("set it to static" in r.reason for r in settings.rejected)


_values = st.one_of(st.none(), st.text(max_size=40), st.lists(st.text(max_size=20), max_size=3),
                    st.integers(), st.sampled_from(["static", "dhcp", "10.0.0.5", "24", "40",
                                                    "255.255.255.0", "wss://h.example/"]))


@hyp_settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(firstboot.USER_DATA_KEYS - {"home_url"})),
                       _values))
def test_normalize_never_raises_and_output_is_usable(raw):
    settings = firstboot.normalize(raw, "fuzz")
    assert settings.mode in ("dhcp", "static")
    if settings.mode == "static":
        network = ipaddress.ip_interface(f"{settings.address}/{settings.prefix}")
        assert network.ip.version == ipaddress.ip_address(settings.address).version
    doc = settings.to_json()
    if "home_urls" in doc:
        check_home_urls(doc["home_urls"], "fuzz")
    check_proxy(doc.get("proxy"), "fuzz")
    json.dumps(doc)


# ------------------------------------------------------------ machine UUID for the agent


def _dmi(directory, **fields):
    directory.mkdir()
    for key, value in fields.items():
        (directory / key).write_text(value + "\n")
    return directory


def test_firstboot_exports_the_machine_uuid_where_the_agent_reads_it(tmp_path):
    dmi = _dmi(tmp_path / "dmi", sys_vendor="QEMU",
               product_uuid="4231A3E6-DEAD-BEEF-0000-0123456789AB")
    run = tmp_path / "run" / "tether"
    line = fa.export_machine_uuid(run, dmi)
    assert line == "tether first boot: machine UUID exported for the agent"
    exported = run / "machine-uuid"
    assert exported.read_text() == "4231a3e6-dead-beef-0000-0123456789ab\n"
    assert exported.stat().st_mode & 0o777 == 0o644
    assert run.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in run.iterdir()] == ["machine-uuid"]  # no temporary left
    m = machine.identify(tmp_path / "no-dmi", credentials_dir="", run_dir=run,
                         machine_id_file=tmp_path / "missing")
    assert m.fingerprint == "uuid:4231a3e6-dead-beef-0000-0123456789ab"
    assert m.fingerprint_source == "machine-uuid exported by tether-firstboot"


def test_firstboot_run_dir_is_the_one_the_agent_reads():
    assert fa.RUN_DIR == machine.FIRSTBOOT_RUN_DIR == DEFAULT_FIRSTBOOT.parent


@pytest.mark.parametrize("uuid", [None, "", "Not Settable", "00000000-0000-0000-0000"])
def test_no_valid_dmi_uuid_writes_nothing_and_is_not_fatal(tmp_path, uuid):
    fields = {"sys_vendor": "QEMU"} | ({} if uuid is None else {"product_uuid": uuid})
    run = tmp_path / "run"
    line = fa.export_machine_uuid(run, _dmi(tmp_path / "dmi", **fields))
    assert line.startswith("tether first boot: no DMI product UUID")
    assert "/etc/machine-id" in line
    assert not (run / "machine-uuid").exists()


def test_export_write_error_is_printed_not_raised(tmp_path):
    dmi = _dmi(tmp_path / "dmi", product_uuid="4231a3e6-dead-beef-0000-0123456789ab")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    line = fa.export_machine_uuid(blocker / "tether", dmi)
    assert line.startswith("tether first boot: machine UUID not exported (")
    assert line.endswith("the agent falls back to /etc/machine-id")


def test_main_exports_the_uuid_first(tmp_path, monkeypatch, capsys):
    dmi = _dmi(tmp_path / "dmi", product_uuid="4231a3e6-dead-beef-0000-0123456789ab")
    real_export = machine.export_uuid
    monkeypatch.setattr(fa.machine, "export_uuid", lambda target, _dmi_dir: real_export(target, dmi))
    monkeypatch.setattr(fa.machine, "detect_platform", lambda: machine.QEMU)
    run, mount = tmp_path / "run", tmp_path / "ovfenv"
    mount.mkdir()
    assert fa.main(["--run-dir", str(run), "--network-dir", str(tmp_path / "net"),
                    "--mount-point", str(mount), "--no-mount", "--no-apply"]) == 0
    assert (run / "machine-uuid").read_text() == "4231a3e6-dead-beef-0000-0123456789ab\n"
    assert (run / "firstboot.json").is_file()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tether first boot: machine UUID exported for the agent"


def test_ec2_only_imports_stay_lazy():
    """The OVF path never needs urllib.request (http.client, email, ssl): not at import."""
    code = ("import sys, tether.agent.firstboot_apply; "
            "print(sorted(m for m in ('urllib.request', 'urllib.error', 'http.client', "
            "'email.parser') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
