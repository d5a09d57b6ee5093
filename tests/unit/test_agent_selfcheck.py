"""Self-check verdict logic on real-shaped figures, platform detection, probes."""

import asyncio
import email.utils
import json
from pathlib import Path

import pytest

from tether.agent import machine, probes, selfcheck
from tether.agent.selfcheck import GiB, MiB, HomeProbe, Measurements

# What psutil reports on a VM built to the OVA's spec (4 vCPU, 8 GiB, 16 GiB disk,
# 4 GiB swap partition): MemTotal is below 8 GiB, SwapTotal one page short.
SPEC_VM = dict(vcpu=4, ram_bytes=8_148_389_888, disk_bytes=16 * GiB,
               swap_bytes=4 * GiB - 4096, free_bytes=9 * GiB)


def measure(platform=machine.VMWARE, **changes):
    return Measurements(platform=platform, **{**SPEC_VM, **changes})


def test_vm_at_spec_is_ok():
    report = selfcheck.evaluate(measure())
    assert report.verdict == selfcheck.OK
    assert report.shortfalls == []


def test_small_vm_lists_every_shortfall_with_figures():
    report = selfcheck.evaluate(measure(vcpu=2, ram_bytes=4 * GiB, disk_bytes=10 * GiB,
                                        swap_bytes=0, free_bytes=200 * MiB))
    assert report.verdict == selfcheck.DEGRADED
    by = {s.check: s for s in report.shortfalls}
    assert set(by) == {"vcpu", "ram", "disk", "swap", "free_space"}
    assert by["vcpu"].measured == 2 and by["vcpu"].required == 4
    assert by["ram"].message == "RAM 4.0 GiB, need 8.0 GiB"
    assert by["disk"].measured == 10 * GiB
    assert by["swap"].required == 4 * GiB


def test_ram_just_below_slack_is_short():
    report = selfcheck.evaluate(measure(ram_bytes=8 * GiB - 600 * MiB))
    assert [s.check for s in report.shortfalls] == ["ram"]


def test_aws_needs_12_gib_and_no_swap():
    report = selfcheck.evaluate(measure(platform=machine.AWS))
    by = {s.check: s for s in report.shortfalls}
    assert set(by) == {"ram", "swap"}
    assert by["ram"].required == 12 * GiB
    assert "requires none" in by["swap"].message
    # m5.xlarge: 4 vCPU, 16 GiB (15.3 GiB visible), no swap
    ok = selfcheck.evaluate(measure(platform=machine.AWS, ram_bytes=16_416_000_000,
                                    swap_bytes=0))
    assert ok.verdict == selfcheck.OK


def test_home_problems_are_shortfalls():
    bad_dns = measure(home=HomeProbe(host="home.example", dns_ok=False, reachable=False,
                                     error="DNS: Name or service not known"))
    assert [s.check for s in selfcheck.evaluate(bad_dns).shortfalls] == ["dns"]
    unreachable = measure(home=HomeProbe(host="h", dns_ok=True, reachable=False))
    checks = [s.check for s in selfcheck.evaluate(unreachable).shortfalls]
    assert checks == ["home_reachable"]
    skewed = measure(home=HomeProbe(host="h", dns_ok=True, reachable=True,
                                    clock_skew_s=-95.2))
    (s,) = selfcheck.evaluate(skewed).shortfalls
    assert s.check == "clock_skew" and s.measured == -95.2
    fine = measure(home=HomeProbe(host="h", dns_ok=True, reachable=True, clock_skew_s=1.5))
    assert selfcheck.evaluate(fine).verdict == selfcheck.OK


def test_report_dict_is_json_and_carries_figures():
    report = selfcheck.evaluate(measure(vcpu=2), now=1_700_000_000.0)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["verdict"] == "degraded"
    assert data["measured"]["vcpu"] == 2
    assert data["required"]["ram_bytes"] == 8 * GiB
    assert data["shortfalls"][0]["check"] == "vcpu"
    assert data["checked_at"] == 1_700_000_000.0
    assert "SHORT vcpu" in selfcheck.format_text(report)


def test_measure_host_reads_real_figures(tmp_path):
    m = selfcheck.measure_host(tmp_path, dmi_dir=tmp_path / "no-dmi")
    assert m.vcpu >= 1 and m.ram_bytes > 256 * MiB and m.disk_bytes > 0
    assert m.free_bytes > 0 and m.platform == machine.OTHER


def test_physical_disk_skips_loop_and_partitions(tmp_path):
    for name, size, real in [("vda", 33554432, True), ("loop0", 999, True),
                             ("sr0", 5, True), ("nodevice", 7, False)]:
        d = tmp_path / name
        d.mkdir()
        (d / "size").write_text(f"{size}\n")
        if real:
            (d / "device").mkdir()
    assert selfcheck.physical_disk_bytes(tmp_path) == 16 * GiB


def dmi(tmp_path, **fields):
    for k, v in fields.items():
        (tmp_path / k).write_text(v + "\n")
    return tmp_path


@pytest.mark.parametrize("fields,platform", [
    ({"sys_vendor": "VMware, Inc.", "product_name": "VMware Virtual Platform"}, "vmware"),
    ({"sys_vendor": "Amazon EC2", "product_name": "m5.xlarge"}, "aws"),
    ({"sys_vendor": "Xen", "product_uuid": "ec2e1916-9099-7caf-fd21-012345abcdef"}, "aws"),
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, "qemu-kvm"),
    ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R640"}, "other"),
])
def test_platform_from_dmi(tmp_path, fields, platform):
    assert machine.detect_platform(dmi(tmp_path, **fields)) == platform


def test_fingerprint_prefers_ec2_instance_id(tmp_path):
    d = dmi(tmp_path, sys_vendor="Amazon EC2", board_asset_tag="i-0123456789abcdef0",
            product_uuid="EC2E1916-9099-7CAF-FD21-012345ABCDEF")
    m = machine.identify(d)
    assert m.platform == "aws" and m.fingerprint == "ec2:i-0123456789abcdef0"


def test_fingerprint_from_uuid_or_credential(tmp_path):
    (tmp_path / "x").mkdir()
    d = dmi(tmp_path / "x", sys_vendor="VMware, Inc.",
            product_uuid="4231A3E6-DEAD-BEEF-0000-0123456789AB")
    assert machine.identify(d).fingerprint == "uuid:4231a3e6-dead-beef-0000-0123456789ab"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "machine-uuid").write_text("4231a3e6-dead-beef-0000-000000000001\n")
    (d / "product_uuid").unlink()  # not readable as an unprivileged user
    m = machine.identify(d, credentials_dir=str(creds), run_dir=None)
    assert m.fingerprint.endswith("000000000001")
    assert m.fingerprint_source == "machine-uuid credential"


def test_fingerprint_from_the_uuid_tether_firstboot_exported(tmp_path):
    run = tmp_path / "run-tether"
    run.mkdir()
    (run / "machine-uuid").write_text("4231A3E6-DEAD-BEEF-0000-000000000002\n")
    m = machine.identify(tmp_path / "no-dmi", credentials_dir="", run_dir=run,
                         machine_id_file=tmp_path / "missing")
    assert m.fingerprint == "uuid:4231a3e6-dead-beef-0000-000000000002"
    assert m.fingerprint_source == "machine-uuid exported by tether-firstboot"
    assert machine.FIRSTBOOT_RUN_DIR == Path("/run/tether")  # what the agent unit can read


def test_exported_uuid_precedence(tmp_path, monkeypatch):
    """$CREDENTIALS_DIRECTORY, then tether-firstboot's run dir, then $RUNTIME_DIRECTORY."""
    places = {}
    for n, name in enumerate(("creds", "run-tether", "runtime"), 1):
        places[name] = tmp_path / name
        places[name].mkdir()
        (places[name] / "machine-uuid").write_text(f"4231a3e6-dead-beef-0000-00000000000{n}\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(places["creds"]))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(places["runtime"]))

    def fingerprint():
        m = machine.identify(tmp_path / "no-dmi", run_dir=places["run-tether"],
                             machine_id_file=tmp_path / "missing")
        return m.fingerprint[-1], m.fingerprint_source

    assert fingerprint() == ("1", "machine-uuid credential")
    (places["creds"] / "machine-uuid").write_text("not-a-uuid\n")  # skipped, not fatal
    assert fingerprint() == ("2", "machine-uuid exported by tether-firstboot")
    (places["run-tether"] / "machine-uuid").unlink()
    assert fingerprint() == ("3", "machine-uuid in the unit's runtime directory")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert machine.exported_uuid(run_dir=places["run-tether"]) == ("", "")


def test_fingerprint_falls_back_to_machine_id(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    m = machine.identify(tmp_path / "none", credentials_dir="", machine_id_file=mid,
                         run_dir=tmp_path / "no-run")
    assert m.fingerprint.startswith("machine-id:") and len(m.fingerprint) == 11 + 64
    with pytest.raises(RuntimeError, match="tether-firstboot"):
        machine.identify(tmp_path / "none", credentials_dir="", run_dir=tmp_path / "no-run",
                         machine_id_file=tmp_path / "missing")


def test_skew_from_date_header():
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 120, usegmt=True)
    assert probes.skew_from_date(header, now - 0.1, now + 0.1) == pytest.approx(120.5)
    assert probes.skew_from_date(None, now, now) is None
    assert probes.skew_from_date("yesterday", now, now) is None


def test_host_port():
    assert probes.host_port("wss://home.example/") == ("home.example", 443)
    assert probes.host_port("wss://127.0.0.1:8443/x") == ("127.0.0.1", 8443)
    with pytest.raises(ValueError, match="wss://"):
        probes.host_port("https://home.example/")


def test_probe_home_reachable_and_unreachable():
    async def ok():
        return {"Date": email.utils.formatdate(usegmt=True)}

    async def refused():
        raise ConnectionRefusedError(111, "Connection refused")

    good = asyncio.run(probes.probe_home("wss://localhost:1/", ok))
    assert good.dns_ok and good.reachable and abs(good.clock_skew_s) < 5
    bad = asyncio.run(probes.probe_home("wss://localhost:1/", refused))
    assert bad.dns_ok and bad.reachable is False and "refused" in bad.error
    nodns = asyncio.run(probes.probe_home("wss://no-such-host.invalid/", ok))
    assert nodns.dns_ok is False


def test_export_uuid_for_the_unprivileged_agent(tmp_path):
    (tmp_path / "vm").mkdir()
    d = dmi(tmp_path / "vm", sys_vendor="QEMU", product_uuid="4231A3E6-DEAD-BEEF-0000-0123456789AB")
    target = tmp_path / "run" / "machine-uuid"
    target.parent.mkdir()
    assert machine.export_uuid(target, d)
    assert target.read_text() == "4231a3e6-dead-beef-0000-0123456789ab\n"
    assert target.stat().st_mode & 0o777 == 0o644
    m = machine.identify(tmp_path / "no-dmi", credentials_dir="", run_dir=target.parent,
                         machine_id_file=tmp_path / "missing")
    assert m.fingerprint == "uuid:4231a3e6-dead-beef-0000-0123456789ab"


def test_export_uuid_without_dmi_writes_nothing_and_succeeds(tmp_path):
    target = tmp_path / "machine-uuid"
    assert not machine.export_uuid(target, tmp_path / "no-dmi")
    assert not target.exists()
    assert machine.main(["export-uuid", str(target)]) == 0
    assert machine.main(["bogus"]) == 2
