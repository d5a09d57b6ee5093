"""The A/B boot script (real grub-script-check) and the trial-boot deadline's rules."""

import importlib.util
import shutil
import subprocess

import pytest

from tether.image import basedisk, bootconf


def _deadline_module():
    spec = importlib.util.spec_from_file_location("trial_deadline", basedisk.TRIAL_DEADLINE_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not shutil.which("grub-script-check"), reason="grub-script-check (grub-common) not installed")
def test_grub_cfg_passes_grub_script_check(tmp_path):
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(bootconf.grub_cfg())
    res = subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grub_counts_tries_per_slot_up_to_the_limit():
    cfg = bootconf.grub_cfg()
    for slot in ("A", "B"):
        for n in range(bootconf.MAX_TRIES):
            assert f'[ "${slot}_TRY" = "{n}" ]; then\n' in cfg
            assert f"set {slot}_TRY={n + 1}\n" in cfg
        # a slot that used its tries is never picked by the first pass
        assert f'"${slot}_TRY" = "{bootconf.MAX_TRIES}"' not in cfg


def test_grub_resets_counts_only_when_nothing_is_left():
    """The sticky-fallback defect: RAUC's example reset the flags whenever entry 0 (A here) booted."""
    cfg = bootconf.grub_cfg()
    first_pass, fallback = cfg.split("# nothing left to boot", 1)
    assert "_TRY=0" not in first_pass.split("load_env", 1)[1]
    assert fallback.index('if [ -z "$CHOSEN" ]; then') < fallback.index("set A_TRY=0")
    assert "default=0" not in cfg and 'set default="slot-$CHOSEN"' in cfg
    assert "--id slot-A" in cfg and "--id slot-B" in cfg


def test_every_slot_reboots_on_panic():
    linux = [l for l in bootconf.grub_cfg().splitlines() if l.strip().startswith("linux ")]
    assert len(linux) == 2 and all(" panic=10 " in l for l in linux)


def test_grubenv_lives_on_the_boot_partition_outside_the_slots():
    tab = {l.split()[1]: l.split() for l in bootconf.fstab().splitlines() if l and not l.startswith("#")}
    assert tab[bootconf.BOOT_MOUNT][0] == "LABEL=boot"
    entries = "\n".join(l for l in bootconf.fstab().splitlines() if not l.startswith("#"))
    assert "root-a" not in entries and "root-b" not in entries


ENV = "# GRUB Environment Block\nORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\n" + "#" * 900


def test_trial_is_an_unconfirmed_slot_with_a_fallback():
    dl = _deadline_module()
    env = dl.parse_env(ENV)
    assert env == {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}
    assert dl.booted_slot("BOOT_IMAGE=/vmlinuz root=PARTLABEL=root-b rauc.slot=B panic=10") == "B"
    assert dl.is_trial(env, "B")
    assert not dl.is_trial({**env, "B_TRY": "0"}, "B"), "marked good: not a trial"
    assert not dl.is_trial({**env, "A_OK": "0"}, "B"), "nothing to fall back to: never reboot"
    assert not dl.is_trial({**env, "A_TRY": "3"}, "B"), "the fallback used its tries: never reboot"
    assert not dl.is_trial(env, None) and not dl.is_trial(env, "C")


def test_first_boot_of_a_fresh_image_is_no_trial():
    dl = _deadline_module()
    env = {**bootconf.GRUBENV_INITIAL, "A_TRY": "1"}
    assert not dl.is_trial(env, "A")


@pytest.mark.parametrize("text, seconds", [
    (None, 300), ("", 300), ("{", 300), ('{"deadline_seconds": 120}', 120),
    ('{"deadline_seconds": 1}', 60), ('{"deadline_seconds": 1e9}', 3600), ('{"deadline_seconds": "x"}', 300),
    ('[1]', 300),
])
def test_deadline_is_bounded(text, seconds):
    assert _deadline_module().deadline(text) == seconds
