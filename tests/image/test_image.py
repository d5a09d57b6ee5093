"""Checks of a finished tether image (issue 3, point 7), one property per test.

Run: `pytest tests/image --image-dir images/<name>/` as root (or `make verify
NAME=<name>`). The disk is attached read-only; nothing in the image changes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).parent))
import nftrules  # noqa: E402

pytestmark = pytest.mark.image

AGENT = "/opt/tether/venv/bin/tether-agent"
UNIT = "tether-agent.service"
GETTY_UNITS = ["getty@.service", "serial-getty@.service", "autovt@.service", "console-getty.service"]
OUT_TCP = {53, 88, 389, 443, 636, 3268, 3269}
OUT_UDP_REQUIRED = {53, 88, 123}
OUT_UDP_ALLOWED = OUT_UDP_REQUIRED | {389}  # CLDAP for the AD DC locator
KERNEL_DRIVERS = ["nvme", "vmxnet3"]


# ------------------------------------------------------------------ agent

def test_agent_installed(host):
    agent = host.file(AGENT)
    assert agent.exists, f"{AGENT} missing: the agent role did not install the venv"
    assert agent.mode & 0o111, f"{AGENT} is not executable"
    assert host.file("/etc/systemd/system/" + UNIT).is_file


def test_appliance_carries_the_agent_without_home_or_image_tooling(host):
    """The venv holds the tether-agent distribution: agent, protocol, shared crypto (issue 13)."""
    site = host.run("ls -d /opt/tether/venv/lib/python3*/site-packages").stdout.strip()
    assert site, "no site-packages in /opt/tether/venv"
    dists = host.run(f"ls -d {site}/tether*.dist-info").stdout.split()
    assert [Path(d).name.split("-")[0] for d in dists] == ["tether_agent"], f"tether distributions: {dists}"
    for part in ("home", "image"):
        assert not host.file(f"{site}/tether/{part}").exists, f"{site}/tether/{part} is on the appliance"
    probe = ("import importlib.util as u; "
             "print(' '.join(n for n in ('tether.agent', 'tether.protocol', 'tether.sealing', 'tether.home', "
             "'tether.image') if u.find_spec(n)))")
    res = host.run(f'/opt/tether/venv/bin/python3 -I -B -c "{probe}"')
    assert res.rc == 0, res.stderr
    assert res.stdout.split() == ["tether.agent", "tether.protocol", "tether.sealing"], res.stdout


def test_agent_install_read_only_for_agent(host):
    venv = host.file("/opt/tether/venv")
    assert venv.user == "root" and not venv.mode & 0o022, "the venv must belong to root, writable by root only"


def test_agent_enabled(host):
    link = host.file(f"/etc/systemd/system/multi-user.target.wants/{UNIT}")
    assert link.is_symlink, f"{UNIT} is not enabled (no link in multi-user.target.wants)"
    assert link.linked_to == f"/etc/systemd/system/{UNIT}"


def test_firstboot_enabled(host):
    link = host.file("/etc/systemd/system/multi-user.target.wants/tether-firstboot.service")
    assert link.is_symlink, "tether-firstboot.service (OVF / EC2 settings) is not enabled"


def test_agent_user_has_no_login(host):
    user = host.user("tether")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    entry = next(line for line in host.file("/etc/shadow").content_string.splitlines()
                 if line.startswith("tether:"))
    assert entry.split(":")[1].startswith(("!", "*")), "user tether has a password"


def test_agent_state_dir(host):
    state = host.file("/data/tether")
    assert state.is_directory, "/data/tether (bind-mounted on /var/lib/tether) missing"
    assert state.user == "tether" and state.group == "tether"
    assert state.mode == 0o700


def test_agent_state_empty(host):
    """No instance key or state from the build: the agent makes them on first boot."""
    left = host.run("find /data/tether -mindepth 1").stdout.split()
    assert left == [], f"agent state left from the build: {left}"


def test_no_build_unit_holds_left(host):
    """The build's drop-ins that keep the agent from running in the build VM are gone."""
    left = host.run("find /etc/systemd/system -name 'zz-tether-build-hold.conf'").stdout.split()
    assert left == [], f"build-time unit holds left: {left}"


def test_no_wheelhouse_left(host):
    assert not host.file("/var/tmp/tether-wheelhouse").exists


# ------------------------------------------------------------------ no way in

@pytest.mark.parametrize("package", ["openssh-server", "openssh-sftp-server"])
def test_no_ssh_server_package(host, package):
    assert not host.package(package).is_installed, f"{package} is installed"


def test_no_sshd_binary(host):
    assert not host.file("/usr/sbin/sshd").exists


@pytest.mark.parametrize("unit", GETTY_UNITS)
def test_getty_masked(host, unit):
    link = host.file(f"/etc/systemd/system/{unit}")
    assert link.is_symlink and link.linked_to == "/dev/null", f"{unit} is not masked"


@pytest.mark.parametrize("unit", ["sys-kernel-debug.mount", "sys-kernel-tracing.mount",
                                  "systemd-firstboot.service", "modprobe@fuse.service",
                                  "systemd-fsckd.socket", "systemd-fsckd.service"])
def test_unused_boot_units_masked(host, unit):
    link = host.file(f"/etc/systemd/system/{unit}")
    assert link.is_symlink and link.linked_to == "/dev/null", f"{unit} is not masked"


@pytest.mark.parametrize("generator", ["systemd-gpt-auto-generator", "systemd-debug-generator",
                                       "systemd-getty-generator", "systemd-sysv-generator"])
def test_unused_generators_disabled(host, generator):
    link = host.file(f"/etc/systemd/system-generators/{generator}")
    assert link.is_symlink and link.linked_to == "/dev/null", f"{generator} still runs at boot"


def test_file_systems_are_still_checked_at_boot(host):
    """Only fsck's progress daemon is masked: root and data keep a check pass in fstab."""
    entries = [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
               if line.strip() and not line.startswith("#")]
    passno = {fields[1]: fields[5] for fields in entries if len(fields) == 6}
    assert passno["/"] == "1" and passno["/data"] == "2"
    assert not host.file("/etc/systemd/system/systemd-fsck-root.service").exists
    assert not host.file("/etc/systemd/system/systemd-fsck@.service").exists


def test_fstab_generator_still_runs(host):
    assert not host.file("/etc/systemd/system-generators/systemd-fstab-generator").exists


def test_first_boot_presets_enable_nothing(host):
    """machine-id "uninitialized" makes systemd apply presets at first boot: they must change nothing."""
    preset = host.file("/etc/systemd/system-preset/00-tether.preset")
    rules = [line.strip() for line in preset.content_string.splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules == ["disable *"]


def test_no_getty_enabled(host):
    found = host.run("find /etc/systemd/system -path '*.wants/*' -name '*getty*'").stdout.split()
    assert found == [], f"getty instances still enabled: {found}"


def test_logind_spawns_no_getty(host):
    text = host.run("cat /etc/systemd/logind.conf.d/*.conf").stdout
    assert "NAutoVTs=0" in text and "ReserveVT=0" in text


def test_root_locked(host):
    root = next(line for line in host.file("/etc/shadow").content_string.splitlines()
                if line.startswith("root:"))
    password = root.split(":")[1]
    assert password.startswith(("!", "*")), "root has a usable password"


def test_no_account_with_password(host):
    usable = [line.split(":")[0] for line in host.file("/etc/shadow").content_string.splitlines()
              if line and not line.split(":")[1].startswith(("!", "*")) and line.split(":")[1] != ""]
    assert usable == [], f"accounts with a password hash: {usable}"


def test_no_build_key(host):
    for path in ("/root/.ssh/authorized_keys", "/root/.ssh/authorized_keys2"):
        assert not host.file(path).exists, f"{path} (the build key) is still in the image"


def test_no_ssh_host_keys(host):
    keys = host.run("ls /etc/ssh/ 2>/dev/null | grep '^ssh_host_' || true").stdout.split()
    assert keys == [], f"SSH host keys in the image: {keys}"


# ------------------------------------------------------------------ identity

@pytest.fixture(scope="module")
def image_key(host):
    key = host.file("/etc/tether/image.key")
    if not key.is_file:
        pytest.fail("/etc/tether/image.key missing: the identity role did not run")
    return serialization.load_pem_private_key(key.content, password=None)


def _fingerprint(key) -> str:
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def test_image_key_mode_and_owner(host):
    key = host.file("/etc/tether/image.key")
    assert key.is_file, "/etc/tether/image.key missing"
    assert key.mode == 0o600, f"image.key has mode {key.mode:o}"
    assert key.user == "tether" and key.group == "tether"


def test_image_key_matches_manifest(image_key, manifest):
    if manifest is None:
        pytest.skip("manifest.json not in the image directory (written at the end of make image)")
    assert "key_fingerprint" in manifest, "manifest.json has no key_fingerprint"
    assert _fingerprint(image_key) == manifest["key_fingerprint"].lower()


def test_image_key_matches_agent_settings(host, image_key):
    settings = json.loads(host.file("/etc/tether/agent.json").content_string)
    assert set(settings) >= {"image_id", "connector", "home_urls", "fingerprint", "cert_serial"}
    assert _fingerprint(image_key) == settings["fingerprint"]


def test_image_certificate_and_ca(host, image_key):
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(host.file("/etc/tether/image.crt").content)
    ca = x509.load_pem_x509_certificate(host.file("/etc/tether/ca.crt").content)
    assert cert.public_key().public_numbers() == image_key.public_key().public_numbers()
    cert.verify_directly_issued_by(ca)
    for name in ("image.crt", "ca.crt", "agent.json"):
        assert host.file(f"/etc/tether/{name}").mode == 0o644


# ------------------------------------------------------------------ firewall

@pytest.fixture(scope="module")
def chains(host):
    conf = host.file("/etc/nftables.conf")
    assert conf.is_file, "/etc/nftables.conf missing"
    return nftrules.parse(conf.content_string)


def _one(chains, hook):
    found = nftrules.by_hook(chains, hook)
    assert len(found) == 1, f"expected one {hook} chain, found {[c.name for c in found]}"
    return found[0]


def test_nftables_enabled(host):
    assert host.file("/etc/systemd/system/sysinit.target.wants/nftables.service").is_symlink


def test_nftables_input_drops_all_but_replies(chains):
    chain = _one(chains, "input")
    assert chain.policy == "drop"
    assert "ct state established,related accept" in chain.rules
    assert 'iif "lo" accept' in chain.rules
    assert chain.ports("tcp") == set(), "inbound TCP ports are open"
    extra = [r for r in chain.accepts() if not (
        r.startswith("ct state") or r.startswith("iif") or "icmpv6 type" in r
        or r.startswith("udp sport 67 udp dport 68") or r.startswith("udp sport 547 udp dport 546"))]
    assert extra == [], f"unexpected inbound accept rules: {extra}"


def test_nftables_forward_drops(chains):
    chain = _one(chains, "forward")
    assert chain.policy == "drop" and chain.accepts() == []


def test_nftables_output_policy(chains):
    chain = _one(chains, "output")
    assert chain.policy == "drop"
    assert "ct state established,related accept" in chain.rules
    assert 'oif "lo" accept' in chain.rules


def test_nftables_output_tcp_ports(chains):
    assert _one(chains, "output").ports("tcp") == OUT_TCP


def test_nftables_output_udp_ports(chains):
    ports = _one(chains, "output").ports("udp")
    assert OUT_UDP_REQUIRED <= ports <= OUT_UDP_ALLOWED, f"outbound UDP ports {sorted(ports)}"


def test_nftables_dhcp(chains):
    assert any(r.startswith("udp sport 68 udp dport 67") for r in _one(chains, "output").accepts())
    assert any(r.startswith("udp sport 67 udp dport 68") for r in _one(chains, "input").accepts())


# ------------------------------------------------------------------ system

def _fstab(host) -> list[list[str]]:
    return [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_swap_in_fstab(host):
    assert any(e[0] == "LABEL=swap" and e[2] == "swap" for e in _fstab(host)), "no LABEL=swap entry in fstab"


def test_machine_id_uninitialized(host):
    assert host.file("/etc/machine-id").content == b"uninitialized\n"
    dbus = host.file("/var/lib/dbus/machine-id")
    assert not dbus.exists or (dbus.is_symlink and dbus.linked_to == "/etc/machine-id")


@pytest.fixture(scope="module")
def kernel_dirs(image_root):
    dirs = sorted(p for p in (image_root / "usr/lib/modules").iterdir() if p.is_dir())
    assert dirs, "no kernel in /lib/modules"
    return dirs


@pytest.mark.parametrize("driver", KERNEL_DRIVERS)
def test_kernel_driver(kernel_dirs, driver):
    for kdir in kernel_dirs:
        builtin = (kdir / "modules.builtin").read_text() if (kdir / "modules.builtin").exists() else ""
        as_module = any(kdir.rglob(f"{driver}.ko*"))
        assert as_module or f"/{driver}.ko" in builtin, f"kernel {kdir.name} has no {driver} driver"


def test_kernel_is_cloud_flavour(kernel_dirs):
    assert all(d.name.endswith("-cloud-amd64") for d in kernel_dirs), [d.name for d in kernel_dirs]


@pytest.mark.parametrize("driver", ["nvme", "ext4"])
def test_kernel_mounts_root_without_initramfs(kernel_dirs, driver):
    """GRUB boots no initramfs: the root disk's driver and file system are built into the kernel."""
    for kdir in kernel_dirs:
        builtin = (kdir / "modules.builtin").read_text() if (kdir / "modules.builtin").exists() else ""
        assert f"/{driver}.ko" in builtin, f"kernel {kdir.name} has {driver} only as a module: it cannot mount root"


def test_no_initramfs_is_booted(host):
    grub = host.file("/boot/grub/grub.cfg").content_string
    assert "initrd" not in grub
    assert not host.run("ls /boot/initrd.img-* 2>/dev/null").stdout.strip(), "an unused initrd is in /boot"


def test_cdrom_drivers_load_early(host, kernel_dirs):
    """tether-firstboot finds the OVF ISO transport's CD without waiting for udev."""
    conf = host.file("/etc/modules-load.d/tether-firstboot.conf").content_string.split()
    assert {"ata_piix", "sr_mod"} <= set(conf)
    for kdir in kernel_dirs:
        for module in ("ata_piix", "sr_mod"):
            assert any(kdir.rglob(f"{module}.ko*")), f"kernel {kdir.name} has no {module} module"


UNUSED_MODULES_CONF = "/etc/modprobe.d/tether-unused-modules.conf"
#: Modules the appliance needs: NIC (vSphere, EC2), the OVF ISO transport's CD,
#: the firewall and the power button (logind's ACPI shutdown).
NEEDED_MODULES = ("vmxnet3", "ena", "ata_piix", "sr_mod", "isofs", "nf_tables", "evdev", "button")


def _modprobe_plan(host, kernel: str, module: str, use_blacklist: bool) -> str:
    """What kmod would insert for `module` (dry run), read through the image's modprobe.d."""
    flags = "--use-blacklist " if use_blacklist else ""
    return host.run(f"modprobe -S {kernel} {flags}--dry-run --verbose {module}").stdout


def test_unused_kernel_modules_are_blacklisted(host, kernel_dirs):
    """udev and systemd load modules by alias with the blacklist applied: these never load at boot."""
    listed = [line.split()[1] for line in host.file(UNUSED_MODULES_CONF).content_string.splitlines()
              if line.startswith("blacklist ")]
    assert {"kvm", "kvm_amd", "kvm_intel", "aesni_intel", "sg"} <= set(listed)
    for kdir in kernel_dirs:
        for module in listed:
            assert "insmod" in _modprobe_plan(host, kdir.name, module, use_blacklist=False), (
                f"{module} is not a module of kernel {kdir.name}: a stale entry in {UNUSED_MODULES_CONF}")
            assert "insmod" not in _modprobe_plan(host, kdir.name, module, use_blacklist=True), (
                f"kmod does not apply the blacklist to {module}")


def test_needed_kernel_modules_still_load(host, kernel_dirs):
    for kdir in kernel_dirs:
        for module in NEEDED_MODULES:
            plan = _modprobe_plan(host, kdir.name, module, use_blacklist=True).replace("-", "_")
            assert f"/{module}.ko" in plan or f"builtin {module}" in plan, (
                f"{module} would not load on kernel {kdir.name}")


def test_serial_console(host):
    grub = host.file("/boot/grub/grub.cfg").content_string
    linux = [line for line in grub.splitlines() if line.strip().startswith("linux ")]
    assert linux and all("console=ttyS0" in line for line in linux)


def test_timesyncd_enabled(host):
    assert host.file("/etc/systemd/system/sysinit.target.wants/systemd-timesyncd.service").is_symlink


def test_journal_persistent(host):
    assert "Storage=persistent" in host.run("cat /etc/systemd/journald.conf.d/*.conf").stdout


def test_kernel_hardening(host):
    text = host.run("cat /etc/sysctl.d/*.conf").stdout
    settings = dict(tuple(p.strip() for p in line.split("=", 1)) for line in text.splitlines()
                    if "=" in line and not line.lstrip().startswith("#"))
    for key, value in {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.all.accept_redirects": "0",
                       "net.ipv4.conf.all.accept_source_route": "0", "kernel.kptr_restrict": "2",
                       "kernel.dmesg_restrict": "1", "fs.suid_dumpable": "0"}.items():
        assert settings.get(key) == value, f"{key} = {settings.get(key)}"


def test_no_core_dumps(host):
    assert "DefaultLimitCORE=0" in host.run("cat /etc/systemd/system.conf.d/*.conf").stdout


# ------------------------------------------------------------------ hygiene

def test_no_logs(host):
    files = host.run("find /data/log -type f").stdout.split()
    assert files == [], f"logs left in the image: {files[:10]}"


def test_no_apt_lists_or_caches(host):
    files = host.run("find /var/lib/apt/lists /var/cache/apt -type f").stdout.split()
    assert files == [], f"apt lists/caches left: {files[:10]}"


def test_tmp_empty(host):
    left = host.run("find /tmp /var/tmp -mindepth 1").stdout.split()
    assert left == [], f"left in /tmp, /var/tmp: {left}"


# ------------------------------------------------------------------ OVA

def test_ova_manifest_matches(image_dir, image_name):
    ova_path = image_dir / f"{image_name}.ova"
    if not ova_path.is_file():
        pytest.fail(f"{ova_path} not found: the build did not finish; run make image again")
    try:
        from tether.image.ova import verify_ova
    except ImportError:
        pytest.skip("tether.image.ova.verify_ova not available")
    problems = verify_ova(ova_path)
    assert problems == [], "\n".join(problems)


def test_copyright_files_kept(host):
    # sysprep removes documentation but the licences travel with the image.
    assert host.file("/usr/share/doc/libc6/copyright").is_file


# ------------------------------------------------------------------ updates (issue 14)

RAUC_CONF = "/etc/rauc/system.conf"


def test_rauc_installed_with_its_service(host):
    for package in ("rauc", "rauc-service"):
        assert host.package(package).is_installed, f"{package} missing: add it to tether/image/data/packages.txt"


def test_rauc_system_conf_uses_grub_and_both_slots(host):
    conf = host.file(RAUC_CONF).content_string
    for line in ("compatible=tether-appliance-amd64", "bootloader=grub", "grubenv=/boot/grub/grubenv",
                 "activate-installed=false", "check-purpose=codesign",
                 "device=/dev/disk/by-partlabel/root-a", "device=/dev/disk/by-partlabel/root-b",
                 "bootname=A", "bootname=B"):
        assert line in conf.splitlines(), f"{RAUC_CONF} lacks {line!r}"


def test_rauc_keyring_is_only_the_homes_update_ca(host, image_dir):
    keyring = host.file("/etc/rauc/keyring.pem").content_string
    assert keyring.count("BEGIN CERTIFICATE") == 1
    update_ca = (image_dir.parent / ".home" / "update" / "update-ca.crt")
    if update_ca.exists():
        assert keyring.strip() == update_ca.read_text().strip()
    assert keyring.strip() != host.file("/etc/tether/ca.crt").content_string.strip(), "not home's TLS CA"


def test_rauc_config_is_accepted_by_rauc(host):
    """rauc parses the image's own system.conf (an unknown key or a bad slot fails here, not in the field)."""
    res = host.run("rauc --conf=/etc/rauc/system.conf info /nonexistent.raucb 2>&1")
    assert "nonexistent.raucb" in res.stdout and "system.conf" not in res.stdout.replace(
        "--conf=/etc/rauc/system.conf", ""), res.stdout


def test_image_version_and_reboot_path(host, image_dir):
    version = host.file("/usr/local/lib/tether/image-version").content_string.strip()
    assert version == json.loads((image_dir / "manifest.json").read_text())["image_version"]
    assert host.file("/etc/systemd/system/multi-user.target.wants/tether-reboot.path").is_symlink
    assert host.file("/etc/systemd/system/multi-user.target.wants/tether-boot-journal.service").is_symlink
    assert host.file("/usr/local/lib/tether/rauc-post-install").mode & 0o111
    assert "tether" in host.file("/etc/dbus-1/system.d/tether-rauc.conf").content_string
