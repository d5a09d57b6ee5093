"""The agent's follower spools an `error` message once per distinct failure (managed.py)."""

from __future__ import annotations

import json

import pytest

from tether.agent.directory.errors import DirectoryError
from tether.agent.directory.managed import BridgeFollower
from tether.agent.directory.spool import Spool


class FakeService:
    """Stands in for DirectoryService: each sync raises the queued error, or streams one end."""

    name = "display-name"

    def __init__(self):
        self.failures: list[DirectoryError | None] = []

    def sync(self, cursor, remembered=None):
        failure = self.failures.pop(0)
        if failure is not None:
            raise failure
        yield {"type": "begin", "mode": "incremental", "directory": self.name}
        yield {"type": "end", "seq": 1, "mode": "incremental", "count": 0, "cursor": "c1"}


def errors(spool: Spool) -> list[dict]:
    return [json.loads(data) for _, data in spool.pending_raw(100)
            if json.loads(data)["type"] == "error"]


@pytest.fixture
def follower(tmp_path):
    return BridgeFollower(FakeService(), Spool(tmp_path / "spool"), tmp_path, ident="corp")


def fail(follower, *failures):
    follower.service.failures.extend(failures)
    for _ in failures:
        with pytest.raises(DirectoryError):
            follower.run_once()


def test_same_failure_is_spooled_once(follower):
    down = DirectoryError("server_down", "cannot connect to ldap1:636", "ldap1:636")
    fail(follower, down, DirectoryError("server_down", "cannot connect to ldap1:636", "ldap1:636"))
    [error] = errors(follower.spool)
    assert error["directory"] == "corp"  # home's id, not the display name
    assert (error["code"], error["server"]) == ("server_down", "ldap1:636")
    assert error["hint"] == down.hint and isinstance(error["at"], float)


def test_a_different_failure_is_spooled_again(follower):
    fail(follower, DirectoryError("server_down", "down"), DirectoryError("bind_failed", "refused"),
         DirectoryError("bind_failed", "refused"))
    assert [e["code"] for e in errors(follower.spool)] == ["server_down", "bind_failed"]


def test_a_good_end_rearms_reporting(follower):
    fail(follower, DirectoryError("bind_failed", "refused"))
    follower.service.failures.append(None)
    follower.run_once()
    assert follower.reported is None and follower.cursor.load() == "c1"
    fail(follower, DirectoryError("bind_failed", "refused"))
    assert len(errors(follower.spool)) == 2


def test_unexpected_exception_is_reported_as_operation_failed(follower):
    follower.service.failures.append(OSError("disk on fire"))
    with pytest.raises(DirectoryError, match="operation_failed"):
        follower.run_once()
    assert errors(follower.spool)[0]["code"] == "operation_failed"
