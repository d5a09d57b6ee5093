"""Home's update records: rollouts supersede each other, progress keeps the last word."""

from tether.home.updatestore import UpdateStore


def test_rollouts_progress_and_running(tmp_path):
    store = UpdateStore(tmp_path / "updates.sqlite3")
    store.add_bundle("1.2", "1.2.raucb", "ab" * 32, 10, "tether-appliance-amd64")
    assert store.bundle("1.2")["size"] == 10 and store.bundle("9") is None
    store.start_rollout("1.2", "acme", 1, 120)
    store.start_rollout("1.3", "acme", 0)
    assert store.rollout("acme")["version"] == "1.3"
    assert [r["status"] for r in store.rollouts()] == ["aborted", "active"]
    assert store.set_rollout_status("acme", "paused")["status"] == "paused"
    assert store.set_rollout_status("nobody", "paused") is None

    store.set_progress("i1", "1.3", "acme", "downloading", percent=40)
    store.set_progress("i1", "1.3", "acme", "failed", detail="rauc install failed: x")
    store.set_progress("i1", "1.3", "acme", "failed")
    row = store.progress("i1", "1.3")
    assert row["state"] == "failed" and row["detail"] == "rauc install failed: x"

    store.record_running("i1", "acme", "1.1", "A")
    store.record_running("i1", "acme", "1.3", "B")
    assert store.running("acme") == [{"instance_id": "i1", "connector": "acme", "image_version": "1.3",
                                      "boot_slot": "B", "seen_at": store.running()[0]["seen_at"]}]
    store.close()
    reopened = UpdateStore(tmp_path / "updates.sqlite3")
    assert reopened.rollout("acme")["status"] == "paused"
    reopened.close()
