"""The agent's decisions about its boot slot after a boot (agent.bootslot)."""

from tether.agent import bootslot as b

P = b.Pending(version="0.1.0.2", slot="B", from_version="0.1.0.1", activated=True)


def test_normal_boot_marks_good_after_the_local_self_check_alone():
    assert b.after_boot("A", None, selfcheck_ok=True, hello_accepted=False) == b.Decision(mark_good=True)
    assert b.after_boot("A", None, selfcheck_ok=False, hello_accepted=True).wait


def test_trial_boot_commits_only_after_self_check_and_home_accepted_the_hello():
    assert b.after_boot("B", P, True, False) == b.Decision(wait=True)
    assert b.after_boot("B", P, False, True) == b.Decision(wait=True)
    assert b.after_boot("B", P, True, True) == b.Decision(mark_good=True, report="committed", clear_pending=True)


def test_fallback_marks_the_other_slot_bad_and_reports_the_rollback():
    d = b.after_boot("A", P, True, False)
    assert d == b.Decision(mark_good=True, mark_other_bad=True, report="rolled_back", clear_pending=True)


def test_an_update_never_activated_is_dropped_without_a_rollback():
    d = b.after_boot("A", b.Pending("0.1.0.2", "B", "0.1.0.1", activated=False), True, True)
    assert d.report is None and not d.mark_other_bad and d.clear_pending


def test_boot_outside_the_ab_grub_touches_nothing():
    assert b.after_boot(None, P, True, True) == b.Decision()


def test_booted_slot_from_the_kernel_command_line():
    assert b.booted_slot("root=PARTLABEL=root-b ro rauc.slot=B panic=10") == "B"
    assert b.booted_slot("root=/dev/sda1") is None
    assert b.other("A") == "B"
