"""The build lock: one build per images/, stale locks detected and taken over."""

import json
import subprocess
import sys

import pytest

from tether.image.errors import BuildError
from tether.image.lock import LOCK_NAME, BuildLock


def test_lock_records_its_owner_and_clears_on_release(tmp_path):
    with BuildLock(tmp_path, name="img1") as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["name"] == "img1" and isinstance(owner["pid"], int)
        assert lock.stale_message() is None
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_second_build_is_refused_while_the_first_runs(tmp_path):
    """Another process holds the lock: the error names it and says what to do."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from pathlib import Path; from tether.image.lock import BuildLock;"
         "l=BuildLock(Path(sys.argv[1]), name='first').acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildError, match=r"another image build .*pid %d.*first" % holder.pid):
            BuildLock(tmp_path, name="second").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_build_is_taken_over_with_a_message(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "started": "2026-01-01T00:00:00Z"}))
    with BuildLock(tmp_path, name="next") as lock:
        message = lock.stale_message()
    assert message and f"pid {dead.pid}" in message and "taking it over" in message


def test_garbage_in_the_lock_file_is_not_fatal(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    with BuildLock(tmp_path) as lock:
        assert lock.stale_message() is None
