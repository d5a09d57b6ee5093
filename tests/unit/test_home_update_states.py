"""One line per instance for `update status` and the status page: the image it runs and
its newest update's state (issue 14 meets issue 15's status page)."""

import time

from tether.home import updates
from tether.home.updatestore import UpdateStore


def _states(store: UpdateStore) -> dict[str, str]:
    return updates.instance_states({"progress": store.progress_of(), "running": store.running()})


def test_each_instance_shows_its_image_and_newest_update(tmp_path):
    store = UpdateStore(tmp_path / "updates.sqlite3")
    store.record_running("i1", "acme", "1.1", "A")
    store.record_running("i2", "acme", None, None)
    store.record_running("i3", "acme", "1.2", "B")
    store.set_progress("i1", "1.2", "acme", "downloading", percent=45)
    store.set_progress("i3", "1.2", "acme", "committed", slot="B")
    time.sleep(0.01)  # updated_at orders the rows of one instance
    store.set_progress("i3", "1.3", "acme", "rolled_back", detail="slot A never became healthy")
    states = _states(store)
    assert states["i1"] == "runs 1.1 (slot A)\tupdate: 1.2 downloading 45%"
    assert states["i2"] == "runs ? (slot ?)\tupdate: -"
    assert states["i3"] == "runs 1.2 (slot B)\tupdate: 1.3 rolled_back (slot A never became healthy)"
    text = updates.render({"bundles": [], "rollouts": [], "progress": store.progress_of(),
                           "running": store.running()})
    assert "  i1\tacme\truns 1.1 (slot A)\tupdate: 1.2 downloading 45%" in text.splitlines()
    store.close()
