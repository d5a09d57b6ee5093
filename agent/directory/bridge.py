"""The agent's directory bridge: home's directory requests in, spooled changes out.

Why a bridge between the agent (`tether.agent.directories`) and the engine: the
channel knows links and protocol messages, the engine knows LDAP; this module
maps one to the other (the contract is in agent/directories.py). It gets the
state directory and the agent's socket pool, never the agent:

- `configure(config)` builds one ManagedDirectory per `config["directories"]`
  entry; a refused one answers its requests with `bad_config`, the others work.
- `handle(link, message)` serves `sync` (follow / full / stop), `search`
  (streamed chunks), `authenticate` and `provision`. The engine blocks (ldap3),
  so every call runs in a worker thread, never on the event loop.
- the Drain task (drain.py) sends the spools home with `directory.changes` over
  whichever socket of the pool is up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from tether import protocol as p

from ..sockets import Sockets
from .drain import Drain
from .errors import DirectoryConfigError, DirectoryError
from .managed import (
    ID_RE,
    ManagedDirectory,
    NotifyingSpool,
    shaping_changed,
    split_by_size,
)

log = logging.getLogger("tether.agent.directory")

#: Engine error code -> protocol error code. `unavailable` tells home to try
#: another connector (reads only); configuration problems will not heal there.
ERROR_CODES = {
    "server_down": p.ErrorCode.UNAVAILABLE,
    "config": p.ErrorCode.BAD_CONFIG,
    "bind_failed": p.ErrorCode.BAD_CONFIG,
    "tls": p.ErrorCode.BAD_CONFIG,
    "missing_attribute": p.ErrorCode.BAD_CONFIG,
    "size_limit": p.ErrorCode.BAD_CONFIG,
    "bad_filter": p.ErrorCode.BAD_TYPE,
}
SYNC_MODES = ("follow", "full", "stop")
SEARCH_KINDS = ("user", "group")
#: Bytes of records per search chunk (well under a frame, so the envelope always fits).
SEARCH_CHUNK_BUDGET = 256 * 1024
#: Longest wait for home to acknowledge search chunks before giving up.
STREAM_ACK_TIMEOUT = 60.0


#: Bounds of the heartbeat's `directories` report (home refuses larger ones).
FLOW_MAX_DIRECTORIES = 32
FLOW_TEXT = 400


def error_reply(ident: str, exc: DirectoryError, refused: bool = False) -> p.HandlerError:
    """The protocol error for an engine failure; detail = the engine's to_dict() as JSON.

    A directory whose configuration was refused answers `bad_config` whatever
    the engine's code (a bad filter there is the configuration's, not the request's).
    """
    code = p.ErrorCode.BAD_CONFIG if refused else ERROR_CODES.get(exc.code, p.ErrorCode.INTERNAL)
    return p.HandlerError(code, json.dumps({"directory": ident, **exc.to_dict()}))


def parse_entries(directories) -> tuple[dict[str, dict], dict[str, DirectoryError]]:
    """Usable entries by id, and refusals (keyed by id, or by position when there is none)."""
    entries: dict[str, dict] = {}
    refused: dict[str, DirectoryError] = {}
    if directories is None:
        return entries, refused
    if not isinstance(directories, list):
        refused["directories"] = DirectoryConfigError("'directories' must be a list of directory objects")
        return entries, refused
    for n, raw in enumerate(directories):
        ident = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(ident, str) or not ID_RE.match(ident):
            refused[f"#{n}"] = DirectoryConfigError(f"directory #{n} needs an 'id' of letters, digits, '_', "
                                           f"'.' or '-' (at most 64), not {ident!r}")
        elif ident in entries:
            refused[ident] = DirectoryConfigError(f"directory id {ident!r} appears twice; ids must be unique")
        else:
            entries[ident] = raw
    return entries, refused


class Bridge:
    """Directory requests for one agent; state under `<state_dir>/directories/<id>/`."""

    def __init__(self, state_dir: Path, sockets: Sockets):
        self.root = Path(state_dir) / "directories"
        # spools and cursors of the directories (user records): owner only, also when an
        # older agent created the directory with the umask's 0755
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        self.directories: dict[str, ManagedDirectory] = {}
        self.refused: dict[str, DirectoryError] = {}
        self.spools: dict[str, NotifyingSpool] = {}  # one per id for the process: seqs stay unique
        self.drain = Drain(lambda: list(self.directories.values()), sockets, self.resign)
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ configuration

    def configure(self, config: dict) -> None:
        """Apply a (new) configuration: keep unchanged directories, rebuild changed ones.

        A rebuilt or removed directory's follower is stopped first (it may take
        as long as one LDAP page), so two followers never write one spool.
        """
        entries, refused = parse_entries((config or {}).get("directories"))
        current: dict[str, ManagedDirectory] = {}
        for ident, raw in entries.items():
            old = self.directories.get(ident)
            current[ident] = old if old is not None and old.raw == raw else self._rebuild(ident, raw, old)
        for ident, old in self.directories.items():
            if ident not in current:
                old.close()
                old.set_leading(False)  # home routes it elsewhere now; re-adding asks again
        self.directories, self.refused = current, refused
        for ident, exc in refused.items():
            log.error("directory %s refused: %s", ident, exc, extra={"tether_directory": ident})
        self.start()

    def _rebuild(self, ident: str, raw: dict, old: ManagedDirectory | None) -> ManagedDirectory:
        if old is not None:
            old.close()
        root = self.root / ident
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if ident not in self.spools:
            self.spools[ident] = NotifyingSpool(root / "spool", self.drain.poke)
        directory = ManagedDirectory(ident, raw, root, self.spools[ident])
        if old is not None and shaping_changed(old.raw, raw):
            directory.forget_cursor()  # records look different now: resync everything
        if directory.leading and directory.service is not None:
            directory.follow(None)  # we led it before the restart/reconfiguration: go on
            log.info("directory %s: following again (this agent leads it)", ident,
                     extra={"tether_directory": ident})
        elif directory.leading:
            directory.report_refusal()  # home keeps us as leader: tell it why nothing comes
        return directory

    def start(self) -> None:
        """Start the drain on the running loop (no-op before the loop runs)."""
        self.drain.start()

    async def close(self) -> None:
        """Agent stopping: stop the drain and the followers; spools and markers stay on disk."""
        await self.drain.stop()
        for directory in list(self.directories.values()):
            await asyncio.to_thread(directory.close)

    def status(self) -> dict:
        out = {ident: d.status() for ident, d in self.directories.items()}
        out.update({ident: {"error": exc.to_dict()} for ident, exc in self.refused.items()})
        return {"directories": out, "drain_error": self.drain.last_error}

    def flow(self) -> dict:
        """Per led directory: spooled entries, how long the oldest waited, why it stalls.

        Why in the heartbeat: a drain that cannot deliver, or a follower that
        cannot reach the directory or write its spool, cannot tell home through
        the spool itself; home shows this in `directory status` (issue 12).
        """
        out = {}
        for ident, d in list(self.directories.items())[:FLOW_MAX_DIRECTORIES]:
            if not (d.leading or len(d.spool)):
                continue
            failure = d.follower.last_error if d.follower is not None else d.error
            error = failure.to_dict() if failure is not None else None
            if error is None and self.drain.last_error and len(d.spool):
                error = {"code": "not_delivered", "message": self.drain.last_error,
                         "hint": "see the agent's journal; home's `directory status` shows "
                                 "why it refused changes, if it did"}
            age = d.spool.oldest_age()
            out[ident] = {"pending": len(d.spool), "waiting_s": round(age, 1) if age else 0.0,
                          "following": d.following,
                          "error": {k: str(v)[:FLOW_TEXT] for k, v in error.items()} if error else None}
        return out

    async def resign(self, directory: ManagedDirectory) -> None:
        """Home takes this directory's changes from another connector: stop following it."""
        async with self._lock(directory.id):
            directory.set_leading(False)
            await asyncio.to_thread(directory.stop_following)
        log.info("directory %s: home named another leader; stopped following", directory.id,
                 extra={"tether_directory": directory.id})

    def _lock(self, ident: str) -> asyncio.Lock:
        return self._locks.setdefault(ident, asyncio.Lock())

    # ------------------------------------------------------------------ requests

    async def handle(self, link, message: p.Message) -> dict:
        """Serve sync / search / authenticate / provision for one directory."""
        self.start()
        directory = self.lookup(message.body.get("directory"))
        try:
            if message.op is p.Op.SYNC:
                return await self.sync(directory, message.body)
            if message.op is p.Op.SEARCH:
                return await self.search(link, message, directory)
            if message.op is p.Op.AUTHENTICATE:
                return await self.authenticate(directory, message.body)
            if message.op is p.Op.PROVISION:
                return await self.provision(directory, message.body)
        except DirectoryError as exc:
            raise error_reply(directory.id, exc) from None
        raise p.HandlerError(p.ErrorCode.UNKNOWN_OP, f"{message.op.value} is not a directory operation")

    def lookup(self, ident) -> ManagedDirectory:
        """The configured, working directory `ident`, or the error home should see."""
        directory = self.directories.get(ident)
        if directory is None and ident in self.refused:
            raise error_reply(ident, self.refused[ident], refused=True)
        if directory is None:
            known = ", ".join(sorted(self.directories)) or "none"
            raise p.HandlerError(p.ErrorCode.NOT_FOUND, f"directory {ident!r} is not configured on "
                               f"this agent; configured: {known}")
        if directory.service is None:
            raise error_reply(ident, directory.error, refused=True)
        return directory

    async def sync(self, directory: ManagedDirectory, body: dict) -> dict:
        """follow / full: lead the directory (spool + drain); stop: stop, keep draining."""
        mode = body.get("mode")
        if mode not in SYNC_MODES:
            raise p.HandlerError(p.ErrorCode.BAD_TYPE, f"sync mode must be one of "
                               f"{', '.join(SYNC_MODES)}, not {mode!r}")
        async with self._lock(directory.id):
            if mode == "stop":
                directory.set_leading(False)
                await asyncio.to_thread(directory.stop_following)
            else:
                directory.set_leading(True)
                await asyncio.to_thread(directory.follow, body.get("cursor"), mode == "full")
        return await asyncio.to_thread(directory.status)

    async def search(self, link, message: p.Message, directory: ManagedDirectory) -> dict:
        """Stream the matching records as `{"entries": [...]}` chunks, then the count."""
        body = message.body
        kind, limit = body.get("kind", "user"), body.get("limit", 100)
        if kind not in SEARCH_KINDS:
            raise p.HandlerError(p.ErrorCode.BAD_TYPE, f"search kind must be 'user' or 'group', not {kind!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise p.HandlerError(p.ErrorCode.BAD_TYPE, f"search limit must be 1..10000, not {limit!r}")
        found = await asyncio.to_thread(directory.service.search, kind, body.get("filter") or None, limit)
        for part in split_by_size(found["results"], SEARCH_CHUNK_BUDGET):
            await link.send_chunk(message, {"entries": part}, STREAM_ACK_TIMEOUT)
        return {"entries": len(found["results"]), "truncated": bool(found["truncated"])}

    async def authenticate(self, directory: ManagedDirectory, body: dict) -> dict:
        """Bind as the user; `groups` are DNs (the protocol's contract), nested ones included.

        `groups: false` skips the group look-up: on OpenLDAP that is one search per
        nesting level, more than half of a login's directory work, which a caller that
        only checks the password should not pay for.
        """
        # the directory's AuthPool checks several logins at once, each in one of its threads
        with_groups = body.get("groups") is not False
        result = await asyncio.get_running_loop().run_in_executor(
            directory.auth_threads(), directory.service.authenticate, body["username"],
            body["password"], with_groups)
        reply = {"ok": result["outcome"] == "success", "outcome": result["outcome"],
                 "dn": result.get("dn"), "server": result.get("server")}
        if with_groups:
            reply["groups"] = [g["dn"] for g in result.get("groups", [])]
        if result.get("reason"):
            reply["reason"] = result["reason"]
        return reply

    async def provision(self, directory: ManagedDirectory, body: dict) -> dict:
        result = await asyncio.to_thread(directory.service.provision, body["order"])
        return {"ok": result.get("status") == "done", "result": result}
