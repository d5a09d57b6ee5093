"""The agent's checks of an update offer: every refusal is one sentence and nothing is started."""

import asyncio

import pytest

from tether.agent import updater

RUNNING = "0.1.0.20260101000000"
NEWER = "0.1.0.20260202000000"
SHA = "ab" * 32


def _updater(tmp_path, slot="A", version=RUNNING):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=PARTLABEL=root-a ro rauc.slot={slot} panic=10\n" if slot else "ro quiet\n")
    version_file = tmp_path / "image-version"
    version_file.write_text(version + "\n")
    return updater.Updater(tmp_path / "state", lambda: [], cmdline=cmdline, version_file=version_file)


def _offer(**changes):
    body = {"version": NEWER, "sha256": SHA, "size": 1024, "compatible": updater.COMPATIBLE,
            "deadline_seconds": 120}
    body.update(changes)
    return body


def test_reads_the_booted_slot_and_the_image_version(tmp_path):
    up = _updater(tmp_path, slot="B")
    assert up.booted == "B" and up.version == RUNNING
    assert up.status()["boot_slot"] == "B"


def test_an_unreadable_version_file_is_the_oldest_version(tmp_path):
    assert updater.running_version(tmp_path / "missing") == "0"
    (tmp_path / "v").write_text("not a version")
    assert updater.running_version(tmp_path / "v") == "0"


@pytest.mark.parametrize("changes, reason", [
    ({"compatible": "other-product-arm64"}, "this appliance is"),
    ({"version": RUNNING}, "not newer"),
    ({"version": "0.0.9"}, "not newer"),
    ({"version": "1.x"}, "dot-separated numbers"),
    ({"sha256": "zz" * 32}, "64 hex digits"),
    ({"sha256": "ab"}, "64 hex digits"),
    ({"size": 0}, "outside"),
    ({"size": 5 * 1024 ** 4}, "outside"),
])
def test_bad_offers_are_refused_with_the_reason(tmp_path, changes, reason):
    up = _updater(tmp_path)
    answer = up.on_offer(_offer(**changes))
    assert answer["accepted"] is False and reason in answer["detail"]
    assert up.task is None


def test_offer_refused_when_not_booted_from_a_slot(tmp_path):
    answer = _updater(tmp_path, slot=None).on_offer(_offer())
    assert answer["accepted"] is False and "A/B root slot" in answer["detail"]


def test_offer_refused_while_an_installed_update_waits_for_its_reboot(tmp_path):
    up = _updater(tmp_path)
    (tmp_path / "state" / "update").mkdir(parents=True)
    up._write_pending(updater.bootslot.Pending(NEWER, "B", RUNNING, True))
    answer = up.on_offer(_offer(version="0.1.0.20260303000000"))
    assert answer["accepted"] is False and "waits for its reboot" in answer["detail"]


def test_offer_refused_without_space_for_the_bundle(tmp_path, monkeypatch):
    # the spare space /data keeps after a download, raised beyond any disk here
    monkeypatch.setattr(updater, "SPACE_MARGIN", 1 << 60)
    answer = _updater(tmp_path).on_offer(_offer())
    assert answer["accepted"] is False and "not enough space" in answer["detail"]


def test_a_good_offer_starts_one_download_and_a_repeat_joins_it(tmp_path):
    async def main():
        up = _updater(tmp_path)
        first = up.on_offer(_offer())
        again = up.on_offer(_offer())
        other = up.on_offer(_offer(version="0.1.0.20260303000000"))
        up.task.cancel()
        return first, again, other
    first, again, other = asyncio.run(main())
    assert first["accepted"] and first["state"] == "offered"
    assert again["accepted"] and again["state"] == "downloading"
    assert other["accepted"] is False and "under way" in other["detail"]


def test_a_repeat_of_the_download_under_way_joins_it_even_when_space_got_short(tmp_path, monkeypatch):
    """Home offers again after every reconnect; the space was checked when the download began."""
    async def main():
        up = _updater(tmp_path)
        first = up.on_offer(_offer())
        monkeypatch.setattr(updater, "SPACE_MARGIN", 1 << 60)
        again = up.on_offer(_offer())
        up.task.cancel()
        return first, again
    first, again = asyncio.run(main())
    assert first["accepted"] and again["accepted"] and again["detail"] == "already under way"


def test_abort_deletes_a_part_left_by_an_earlier_run(tmp_path):
    up = _updater(tmp_path)
    part = tmp_path / "state" / "update" / f"{NEWER}.raucb.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100)
    answer = up.on_offer(_offer(action="abort"))
    assert answer["accepted"] and not part.exists()


def test_abort_is_refused_while_rauc_writes_the_slot(tmp_path):
    async def main():
        up = _updater(tmp_path)
        up.on_offer(_offer())
        up.installing = True
        answer = up.on_offer(_offer(action="abort"))
        assert not up.task.done()
        up.task.cancel()
        return answer
    answer = asyncio.run(main())
    assert answer["accepted"] is False and "cannot be stopped" in answer["detail"]


def test_a_failed_update_leaves_no_part_and_a_full_disk_keeps_the_report_in_memory(tmp_path, monkeypatch):
    up = _updater(tmp_path)
    part = tmp_path / "state" / "update" / f"{NEWER}.raucb.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(updater, "write_atomic", full)
    up._failed(NEWER, "OSError: [Errno 28] No space left on device")
    assert not part.exists()
    assert up.unsaved == [{"version": NEWER, "state": "failed",
                           "detail": "OSError: [Errno 28] No space left on device"}]


def test_outbox_is_bounded_and_survives_a_restart(tmp_path):
    up = _updater(tmp_path)
    for n in range(updater.MAX_OUTBOX + 5):
        up._queue({"version": NEWER, "state": "failed", "detail": str(n)})
    again = _updater(tmp_path)
    items = again._outbox()
    assert len(items) == updater.MAX_OUTBOX and items[-1]["detail"] == str(updater.MAX_OUTBOX + 4)


def test_journal_excerpt_is_the_failed_slots_kept_file_bounded(tmp_path):
    up = _updater(tmp_path)
    assert "no journal kept for slot B" in up._journal_excerpt("B")
    (tmp_path / "state" / "update").mkdir(parents=True)
    (tmp_path / "state" / "update" / "last-boot-B.txt").write_text("x" * 100_000 + "\nagent never started\n")
    text = up._journal_excerpt("B")
    assert text.endswith("agent never started\n") and len(text) <= updater.p.JOURNAL_TEXT


def test_reports_kept_in_memory_go_home_first(tmp_path):
    sent = []

    class Link:
        draining = False

        async def request(self, op, body, timeout):
            sent.append((op, body))

    up = _updater(tmp_path)
    up.links = lambda: [Link()]
    up.unsaved = [{"version": NEWER, "state": "failed", "detail": "disk full"}]
    up._queue({"version": NEWER, "state": "committed"})
    asyncio.run(up.flush_outbox())
    assert [b["state"] for _, b in sent] == ["failed", "committed"]
    assert up.unsaved == [] and up._outbox() == []
