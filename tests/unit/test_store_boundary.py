"""Every SQL statement of home lives in a store module (issue 13).

Home will run as replicas sharing PostgreSQL once its users outgrow one machine;
that day must be a new store implementation beside the SQLite one, not a hunt
for statements across the server. So outside the store modules no home module
imports ``sqlite3`` or runs a statement (``.execute(``, ``.executemany(``,
``.executescript(``): it calls a store method named for what it does. The check
reads the source with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from tether.home import stores
from tether.home.store import Store

HOME = Path(__file__).resolve().parents[2] / "home"
#: The modules allowed to speak SQL, relative to home/ (a folder: all of it).
STORE_MODULES = ("store.py", "sqlite.py", "apistore.py", "updatestore.py", "bookkeeping.py",
                 "directorystore/")
STATEMENT_CALLS = {"execute", "executemany", "executescript"}


def is_store_module(relative: str) -> bool:
    return any(relative == s or (s.endswith("/") and relative.startswith(s))
               for s in STORE_MODULES)


def sql_uses(source: str) -> list[str]:
    """What in ``source`` speaks SQL directly: sqlite3 imports and statement calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "sqlite3"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in STATEMENT_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
    return found


def test_the_check_sees_sql():
    source = "import sqlite3\nfrom sqlite3 import Row\ndb.execute('SELECT 1')\nc.executemany(q, r)\n"
    assert len(sql_uses(source)) == 4
    assert sql_uses("store.instances()\nloop.run_in_executor(None, f)\n") == []


def test_no_sql_outside_the_store_modules():
    offenders = []
    for path in sorted(HOME.rglob("*.py")):
        relative = path.relative_to(HOME).as_posix()
        if is_store_module(relative):
            continue
        offenders += [f"home/{relative} {use}" for use in sql_uses(path.read_text("utf-8"))]
    assert not offenders, ("SQL outside home's store modules (move it behind a store method): "
                           + "; ".join(offenders))


def test_the_sqlite_store_implements_every_narrow_interface():
    """A second engine implements tether.home.stores; the SQLite one must match it exactly."""
    interfaces = [stores.Routing, stores.Configurations, stores.Certificates, stores.Instances,
                  stores.AgentRecords]
    for interface in interfaces:
        methods = [n for n, v in vars(interface).items() if callable(v) and not n.startswith("_")]
        assert methods, interface
        for name in methods:
            assert inspect.signature(getattr(Store, name)) == \
                inspect.signature(getattr(interface, name)), f"{interface.__name__}.{name}"
