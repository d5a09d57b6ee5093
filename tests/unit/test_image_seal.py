"""Offline clean-up after the poweroff: per-instance and log files go, the rest stays."""

from tether.image import seal


def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_clean_removes_seed_and_logs_and_keeps_the_rest(tmp_path):
    root, data = tmp_path / "root", tmp_path / "data"
    _touch(root / "var/lib/systemd/random-seed")
    _touch(root / "etc/machine-id", "uninitialized\n")
    _touch(data / "log/journal/abc/system.journal")
    _touch(data / "log/journal/system.journal")
    _touch(data / "tether/keep")
    (root / "var/log").mkdir(parents=True)
    removed = seal.clean(root, data)
    assert "/var/lib/systemd/random-seed" in removed
    assert "/data/log/journal/abc/system.journal" in removed and "/data/log/journal/system.journal" in removed
    assert not (root / "var/lib/systemd/random-seed").exists()
    assert (data / "log/journal/abc").is_dir()  # directories stay (journald's layout)
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    assert (data / "tether/keep").exists()


def test_clean_on_an_already_clean_disk_removes_nothing(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "data").mkdir()
    assert seal.clean(tmp_path / "root", tmp_path / "data") == []
