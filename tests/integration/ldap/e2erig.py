"""Process plumbing for the end-to-end directory tests and bench/directory.py.

Everything is a real process on 127.0.0.1: ``tether-home serve`` (homeproc.HomeProcess),
``tether-agent run`` processes enrolled with image credentials (laid out like the
ansible ``identity`` role does), slapd / Samba from the ldap fixtures. Processes are
stopped by PID only.

    rig = Rig.start(tmp, connectors=("c-a", "c-b"), cluster="east")
    a = rig.agent("c-a")                     # started, enrolled, both sockets up
    rig.configure({"directories": [directory_entry("corp", raw)]})   # every connector
    rig.wait_store_equals("corp", lambda: ldap_rows(admin_conn, ...))
    rig.authenticate("corp", "u000", "pw000")  # CompletedProcess of tether-home
    rig.stop()

What "equal" means: the export CSV rows of home's store (``tether-home export``)
against the same rows built from a plain ldap3 search of the directory
(:func:`ldap_rows`): kind, id (entryUUID / objectGUID), DN, every mapped
attribute, disabled, member_of, members.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tether import dn as dnmeaning

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from homeproc import (  # noqa: E402
    HomeProcess, LoggedProcess, agent_run_args, fake_dmi, install_credential, spawn_agent)

CSV_MULTI = "|"
#: The seed directory's user and group filters (ldapfix_helpers.seed_ldif).
USERS_F = "(objectClass=inetOrgPerson)"
GROUPS_F = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"

#: Default field -> attribute mapping of the engine (agent/directory/config.py).
OPENLDAP_MAPPING = {"user": {"username": "uid", "name": "cn", "email": "mail"},
                    "group": {"name": "cn"}}
AD_MAPPING = {"user": {"username": "sAMAccountName", "name": "displayName", "email": "mail",
                       "upn": "userPrincipalName"},
              "group": {"name": "sAMAccountName"}}


# ------------------------------------------------------------------ agent process


class Agent(LoggedProcess):
    """One ``tether-agent run`` process (own state, own fake DMI = own machine)."""

    def __init__(self, root: Path, connector: str, bundle: dict) -> None:
        self.root, self.connector = root, connector
        root.mkdir(parents=True, exist_ok=True)
        self.etc = install_credential(bundle, root / "etc")
        self.state = root / "state"
        self.dmi = fake_dmi(root / "dmi")
        self.log_path = root / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Agent:
        command = agent_run_args(self.etc, self.state, self.root / "firstboot.json", self.dmi)
        self.proc = spawn_agent(command, self.log_path)
        return self

    def instance_id(self) -> str | None:
        path = self.state / "instance.json"
        return json.loads(path.read_text()).get("instance_id") if path.exists() else None

    def wait_log(self, needle: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(needle) >= count:
                return
            if not self.alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"agent {self.connector}: no {needle!r} (x{count}) in its log after "
                             f"{timeout} s; alive={self.alive()}; tail:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """Crash: SIGKILL to this process's PID (nothing else)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# ------------------------------------------------------------------ home + agents


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll until ``predicate()`` is truthy and return it; the last value goes in the error."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class Rig:
    """A real home with connectors in one cluster, and the agents started for them."""

    def __init__(self, home: HomeProcess, connectors: tuple[str, ...], cluster: str = "east") -> None:
        self.home = home
        self.connectors = connectors
        self.cluster = cluster
        self.agents: list[Agent] = []

    @classmethod
    def start(cls, tmp: Path, connectors: tuple[str, ...] = ("c-a",), cluster: str = "east",
              max_instances: int = 1) -> Rig:
        home = HomeProcess.start(tmp / "home", connector=connectors[0],
                                 max_instances=max_instances, cluster=cluster)
        try:
            for name in connectors[1:]:
                home.cli("connector", "create", name, "--cluster", cluster,
                         "--max-instances", str(max_instances))
        except Exception:
            home.stop()
            raise
        return cls(home, connectors, cluster)

    @property
    def state(self) -> Path:
        return self.home.state

    def agent(self, connector: str, wait: bool = True) -> Agent:
        """Issue an image credential for ``connector`` and start an agent from it."""
        bundle = self.home.issue_image(connector=connector)
        agent = Agent(self.home.root / f"agent-{connector}-{len(self.agents)}", connector, bundle)
        self.agents.append(agent)
        agent.start()
        if wait:
            agent.wait_log("socket 1 connected", 90)
        return agent

    def configure(self, config: dict, connectors: tuple[str, ...] | None = None) -> None:
        """``tether-home config set`` for each connector (secrets are sealed by home)."""
        for name in connectors or self.connectors:
            self.home.set_config(config, connector=name)

    def start_failover(self, config: dict, directory: str, expected) -> tuple[Agent, Agent]:
        """Failover policy with the first connector as primary, an agent for each of the
        first two connectors, ``config`` on every connector; returns the two agents once
        the store of ``directory`` equals ``expected()``."""
        primary, other = self.connectors[:2]
        policy = self.cli("cluster", "set", self.cluster, "--policy", "failover", "--primary", primary)
        assert policy.returncode == 0, policy.stderr
        agents = self.agent(primary), self.agent(other)
        self.configure(config)
        self.wait_store_equals(directory, expected)
        return agents

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.home.stop()

    # -------------------------------------------------------- home's CLI

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return self.home.cli(*args, check=False, input=input)

    def authenticate(self, directory: str, user: str, password: str) -> subprocess.CompletedProcess:
        return self.cli("authenticate", user, "--directory", directory, input=password + "\n")

    def provision(self, directory: str, order: dict) -> subprocess.CompletedProcess:
        path = self.home.root / f"order-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(order))
        return self.cli("provision", "--directory", directory, "--order", str(path))

    def directory_status(self, directory: str) -> dict | None:
        result = self.cli("directory", "status", "--json")
        if result.returncode != 0:
            return None
        doc = json.loads(result.stdout)
        rows = doc["directories"] if isinstance(doc, dict) else doc
        return next((r for r in rows if r.get("directory") == directory), None)

    def export(self, directory: str) -> list[dict] | None:
        """The store as export CSV rows (None while the directory is not in the store yet)."""
        out = self.home.root / f"export-{directory}.csv"
        result = self.cli("export", "--directory", directory, "--csv", str(out))
        if result.returncode != 0:
            return None
        with open(out, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def wait_store_equals(self, directory: str, expected, timeout: float = 180.0) -> list[dict]:
        """Poll the export until it equals ``expected()`` (re-read each time); returns the rows.

        On timeout the assertion names the first rows that differ.
        """
        last: dict = {}

        def same():
            rows, want = self.export(directory), expected()
            last.update(rows=rows, want=want)
            return rows is not None and rows == want
        try:
            wait_for(same, timeout, f"home's store of {directory} to equal the directory", 1.0)
        except AssertionError:
            raise AssertionError(f"store of {directory} != directory after {timeout} s:\n"
                                 + describe_difference(last.get("rows") or [], last.get("want") or [])
                                 + f"\nhome log tail:\n{self.home.log_text()[-3000:]}"
                                 + "".join(f"\nagent {a.connector} ({a.pid}) tail:\n{a.log()[-2500:]}"
                                           for a in self.agents)) from None
        return last["rows"]


def describe_difference(got: list[dict], want: list[dict]) -> str:
    by_id_got = {r["id"]: r for r in got}
    by_id_want = {r["id"]: r for r in want}
    lines = [f"store {len(got)} rows, directory {len(want)} rows"]
    for rid in sorted(set(by_id_want) - set(by_id_got))[:5]:
        lines.append(f"  missing in store: {by_id_want[rid]}")
    for rid in sorted(set(by_id_got) - set(by_id_want))[:5]:
        lines.append(f"  extra in store: {by_id_got[rid]}")
    for rid in sorted(set(by_id_got) & set(by_id_want)):
        if by_id_got[rid] != by_id_want[rid]:
            lines.append(f"  differs: store {by_id_got[rid]}\n        directory {by_id_want[rid]}")
            if len(lines) > 12:
                break
    if len(by_id_got) != len(got):
        lines.append("  the store export repeats ids")
    return "\n".join(lines)


# ------------------------------------------------------------------ directory side


def directory_entry(ident: str, raw: dict) -> dict:
    """One ``directories`` item of a connector configuration (engine keys + id)."""
    return {"id": ident, **raw}


def _text(value) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _cell(values: list[str]) -> str:
    return CSV_MULTI.join(values)


def _dn_key(dn: str) -> str:
    try:
        return dnmeaning.key(dn)
    except dnmeaning.DNError:
        return "!" + dn.lower()


def ldap_rows(conn, base: str, user_filter: str, group_filter: str, mapping: dict,
              id_attr: str = "entryUUID", member_attr: str = "member", ad: bool = False) -> list[dict]:
    """What home's export CSV must hold, built from a plain ldap3 search of the directory.

    Same format as ``DirectoryStore.export_csv``: users then groups, each by DN
    (SQLite's binary order), multi-valued cells joined with ``|``.
    """
    records = []
    for kind, flt in (("user", user_filter), ("group", group_filter)):
        attrs = sorted({id_attr, *mapping[kind].values(),
                        *([member_attr] if kind == "group" else []),
                        *(["userAccountControl"] if ad and kind == "user" else [])})
        for entry in conn.extend.standard.paged_search(base, flt, attributes=attrs, paged_size=500,
                                                       generator=True):
            if entry.get("type") != "searchResEntry":
                continue
            raw = entry["raw_attributes"]
            get = {k.lower(): v for k, v in raw.items()}
            rid = get[id_attr.lower()][0]
            rid = str(uuid.UUID(bytes_le=bytes(rid))) if ad else rid.decode()
            record = {"kind": kind, "id": rid, "dn": entry["dn"], "attributes": {},
                      "members": _text(get.get(member_attr.lower())) if kind == "group" else None,
                      "disabled": None}
            for field, attr in mapping[kind].items():
                record["attributes"][field] = _text(get.get(attr.lower()))
            if ad and kind == "user" and get.get("useraccountcontrol"):
                record["disabled"] = bool(int(_text(get["useraccountcontrol"])[0]) & 0x2)
            records.append(record)
    fields = sorted({f for m in mapping.values() for f in m})
    member_of: dict[str, list[str]] = {}  # by DN meaning (issue 12), not by spelling
    for r in records:
        for dn in r["members"] or []:
            member_of.setdefault(_dn_key(dn), []).append(r["dn"])
    records.sort(key=lambda r: (r["kind"] != "user", r["dn"].encode()))
    rows = []
    for r in records:
        row = {"kind": r["kind"], "id": r["id"], "dn": r["dn"]}
        for f in fields:
            row[f] = _cell(r["attributes"].get(f, []))
        row["disabled"] = "" if r["disabled"] is None else ("true" if r["disabled"] else "false")
        row["member_of"] = _cell(sorted(member_of.get(_dn_key(r["dn"]), []), key=_dn_key))
        row["members"] = _cell(r["members"]) if r["kind"] == "group" else ""
        rows.append(row)
    return rows
