"""Small pieces of home: --listen parsing, log formatting, status rendering, control socket."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tether.home import control, logs, status
from tether.home.server import ListenError, parse_listen


@pytest.mark.parametrize("value, host, port", [
    ("0.0.0.0:443", "0.0.0.0", 443), ("[::1]:8443", "::1", 8443),
    ("home.example.invalid:0", "home.example.invalid", 0),
])
def test_parse_listen(value, host, port):
    listen = parse_listen(value)
    assert (listen.host, listen.port) == (host, port)


@pytest.mark.parametrize("value", ["443", ":443", "host:", "host:99999", "host:abc"])
def test_parse_listen_refuses(value):
    with pytest.raises(ListenError):
        parse_listen(value)


def _record(**fields) -> logging.LogRecord:
    record = logging.LogRecord("tether.home.x", logging.INFO, __file__, 1, "enrolled", (), None)
    record.tether_fields = fields
    return record


def test_text_log_line_is_key_value():
    line = logs.TextFormatter().format(_record(instance="i-1", detail="two words",
                                               urls=["a", "b"], n=3, none=None))
    assert line.split(" ", 3)[1:3] == ["INFO", "tether.home.x"]
    assert 'instance=i-1 detail="two words" urls=a,b n=3 none=null' in line


def test_json_log_line():
    doc = json.loads(logs.JsonFormatter().format(_record(instance="i-1")))
    assert doc["event"] == "enrolled" and doc["instance"] == "i-1" and doc["level"] == "INFO"


def test_render_status_shows_figures_and_clones():
    doc = {
        "server": {"pid": 1, "addresses": ["127.0.0.1:443"], "sockets": 2, "uptime": 5,
                   "tls_refusals": {"CERTIFICATE_VERIFY_FAILED": 2}},
        "connectors": [{"name": "acme", "cluster": "acme", "max_instances": 1,
                        "config_version": 3}],
        "images": [{"image_id": "img", "connector": "acme", "instances": 1,
                    "cert_serial": "ab", "revoked": False}],
        "instances": [{"instance_id": "i-1", "connector": "acme", "connected_sockets": 2,
                       "seen_ago": 3.0, "agent_version": "0.1.0", "config_version": 3,
                       "config_status": "applied", "listening": [], "cert_revoked": False,
                       "machine": {"fingerprint": "uuid"},
                       "selfcheck": {"verdict": "degraded",
                                     "measured": {"vcpu": 2, "ram_bytes": 8 * 2**30},
                                     "shortfalls": [{"message": "2 vCPU, need 4"}]}}],
        "clones": [{"image_id": "img", "machine_fingerprint": "uuid-2", "attempts": 4,
                    "last_seen": 0}],
    }
    text = status.render(doc)
    assert "TLS refusals 2" in text and "sockets=2" in text and "listening=0" in text
    assert "cert=-" in text
    assert "degraded vcpu=2 ram=8.0GiB [short: 2 vCPU, need 4]" in text
    assert "machine=uuid-2 attempts=4" in text
    assert "LISTENING" not in text
    doc["instances"][0]["listening"] = [{"laddr": "0.0.0.0:22", "kind": "tcp"}]
    assert 'LISTENING: {"kind": "tcp", "laddr": "0.0.0.0:22"}' in status.render(doc)


def test_control_socket_round_trip(tmp_path):
    path = tmp_path / "control.sock"

    async def handler(request: dict) -> dict:
        if request["cmd"] == "boom":
            raise RuntimeError("handler bug")
        return {"ok": True, "echo": request}

    async def go():
        server = await control.start(path, handler)
        try:
            ok = await asyncio.to_thread(control.call, path, {"cmd": "ping"})
            bad = await asyncio.to_thread(control.call, path, {"nocmd": 1})
            boom = await asyncio.to_thread(control.call, path, {"cmd": "boom"})
            mode = path.stat().st_mode & 0o777
        finally:
            server.close()
        return ok, bad, boom, mode
    ok, bad, boom, mode = asyncio.run(go())
    assert ok == {"ok": True, "echo": {"cmd": "ping"}}
    assert bad["ok"] is False and "cmd" in bad["error"]
    assert boom["ok"] is False and "handler bug" in boom["error"]
    assert mode == 0o600
    path.unlink(missing_ok=True)
    assert control.call(path, {"cmd": "live"}) is None
