"""The accelerator decision: KVM only when a Linux kernel really booted with it."""

import json

from tether.image import accel


def test_no_device_means_tcg():
    d = accel.decide(False, None)
    assert d.accelerator == "tcg" and "/dev/kvm" in d.reason


def test_device_but_no_kernel_means_tcg():
    assert accel.decide(True, None).accelerator == "tcg"


def test_device_and_failed_boot_means_tcg_with_the_reason():
    d = accel.decide(True, accel.ProbeResult(False, "KVM internal error. Suberror: 1"))
    assert d.accelerator == "tcg" and "Suberror" in d.reason


def test_device_and_booted_kernel_means_kvm():
    assert accel.decide(True, accel.ProbeResult(True, "ok")).accelerator == "kvm"


def test_probe_reads_the_kernel_console(tmp_path, monkeypatch):
    """A fake qemu prints what a kernel prints; the probe decides from the text."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho '[ 1.6] Kernel panic - not syncing: VFS: Unable to mount root fs'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert accel.probe_kvm(tmp_path / "vmlinuz", timeout=10).booted
    fake.write_text("#!/bin/sh\necho 'KVM internal error. Suberror: 1' >&2\necho 'emulation failure' >&2\nexit 1\n")
    result = accel.probe_kvm(tmp_path / "vmlinuz", timeout=10)
    assert not result.booted and "KVM internal error" in result.detail


def test_probe_timeout_is_a_failure(tmp_path, monkeypatch):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    result = accel.probe_kvm(tmp_path / "vmlinuz", timeout=0.5)
    assert not result.booted and "no result" in result.detail


def test_decision_is_cached_per_host_boot_and_kernel(tmp_path, monkeypatch):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel-1")
    cache = tmp_path / "cache"
    calls = []
    monkeypatch.setattr(accel, "kvm_usable_device", lambda device=accel.KVM_DEVICE: True)
    monkeypatch.setattr(accel, "probe_kvm", lambda k, timeout=0: calls.append(k) or accel.ProbeResult(False, "hung"))
    first, cached1 = accel.choose(kernel, cache)
    second, cached2 = accel.choose(kernel, cache)
    assert (first.accelerator, cached1, second.accelerator, cached2) == ("tcg", False, "tcg", True)
    assert len(calls) == 1 and json.loads(accel.entry(cache, kernel).path().read_text())["accelerator"] == "tcg"
    kernel.write_bytes(b"kernel-2")  # another kernel: probe again
    accel.choose(kernel, cache)
    assert len(calls) == 2


def test_a_missing_device_is_not_usable(tmp_path):
    assert not accel.kvm_usable_device(tmp_path / "kvm")
