"""The agent's side of whole-image updates (issue 14): offer, download, install, commit or roll back.

Home offers a version (``update``); the agent checks the offer (product,
newer than what runs, size, free space on /data), downloads the bundle in
bounded pieces over its own sockets to home (``update.fetch``: the same way
out as the channel, CONNECT proxy included), resumes a download a lost
socket or a restart interrupted from what is already on disk, checks size
and SHA256, and hands it to RAUC (``rauc install``), which checks home's
signature against the image's keyring and writes the idle slot. Only then
does the agent activate that slot, record the pending update on /data, set
the trial deadline and ask for a reboot (tether-reboot.path: the sandboxed
agent cannot reboot itself).

After every boot :func:`tether.agent.bootslot.after_boot` decides: the new
slot is marked good only after the self-check ran and home accepted the
hello (then ``committed`` is reported); a GRUB fallback marks the other
slot bad and reports ``rolled_back``. Reports that must reach home wait in
an outbox on disk until home acknowledged them.

It gets what it needs, not the whole agent: the state directory, a function
that lists the open sockets, the self-check verdict, and the rauc command.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tether.atomicfile import write_atomic
from tether import imageversion
from tether import protocol as p

from . import bootslot

log = logging.getLogger("tether.agent.update")

COMPATIBLE = "tether-appliance-amd64"  # tether.image.bundle.COMPATIBLE (the agent does not import the image tooling)
VERSION_FILE = Path("/usr/local/lib/tether/image-version")
CMDLINE = Path("/proc/cmdline")
#: Space left on /data after the download (journal, spool, configuration).
SPACE_MARGIN = 256 * 1024 * 1024
#: A report of progress at most every this many percent.
PERCENT_STEP = 10
MAX_OUTBOX = 16
FETCH_TIMEOUT = 60.0
INSTALL_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Offer:
    version: str
    sha256: str
    size: int
    deadline_seconds: int


class UpdateRefused(Exception):
    """An offer the agent will not take; the message says why (sent to home)."""


def running_version(path: Path = VERSION_FILE) -> str:
    """The image version of the booted slot (written by the build, or by RAUC's post-install handler)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:64].strip()
        imageversion.parse(text)
        return text
    except (OSError, imageversion.VersionError):
        return "0"


class Updater:
    """Update state of one agent; files under ``<state>/update/`` (on /data)."""

    def __init__(self, state_dir: Path, links: Callable[[], list], *, rauc: str = "rauc",
                 cmdline: Path = CMDLINE, version_file: Path = VERSION_FILE,
                 selfcheck_ok: Callable[[], bool] = lambda: True) -> None:
        self.dir = state_dir / "update"
        self.links = links
        self.rauc = rauc
        self.booted = bootslot.booted_slot(_read(cmdline))
        self.version = running_version(version_file)
        self.selfcheck_ok = selfcheck_ok
        self.task: asyncio.Task | None = None
        self.current: Offer | None = None
        self.settled = False
        self.installing = False  # rauc install and activation under way: no abort
        self.unsaved: list[dict] = []  # reports /data had no room for (sent first)
        self.wake = asyncio.Event()

    # ---- files

    def _path(self, name: str) -> Path:
        return self.dir / name

    def pending(self) -> bootslot.Pending | None:
        try:
            return bootslot.Pending(**json.loads(self._path("pending.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_pending(self, pending: bootslot.Pending) -> None:
        write_atomic(self._path("pending.json"), json.dumps(asdict(pending)).encode(), mode=0o600)

    def _outbox(self) -> list[dict]:
        try:
            items = json.loads(self._path("outbox.json").read_text())
            return items if isinstance(items, list) else []
        except (OSError, ValueError):
            return []

    def _queue(self, body: dict) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            items = (self._outbox() + [body])[-MAX_OUTBOX:]
            write_atomic(self._path("outbox.json"), json.dumps(items).encode(), mode=0o600)
        except OSError as exc:  # /data full or read-only: the report still goes home from memory
            log.error("update report kept in memory only (%s): %s", exc, body)
            self.unsaved = (self.unsaved + [body])[-MAX_OUTBOX:]
        self.wake.set()

    # ---- offers

    def on_offer(self, body: dict) -> dict:
        """Answer home's ``update`` request; the work runs in the background."""
        if body.get("action") == "abort":
            under_way = self.task is not None and not self.task.done() and self.current is not None \
                and self.current.version == body["version"]
            if under_way and self.installing:
                return {"accepted": False, "state": "installing",
                        "detail": "rauc is writing the slot; it cannot be stopped half way"}
            if under_way:
                self.task.cancel()
            self._discard(str(body["version"]))  # a part left by an earlier run goes too
            return {"accepted": True, "state": "aborted" if under_way else None,
                    "detail": "download dropped" if under_way else "nothing under way"}
        if self.task is not None and not self.task.done() and self.current \
                and self.current.version == body.get("version") \
                and self.current.sha256 == str(body.get("sha256")).lower():
            # home offers again after a reconnect: join it (its space was checked at the start)
            return {"accepted": True, "state": "downloading", "detail": "already under way"}
        try:
            offer = self._check(body)
        except UpdateRefused as exc:
            log.warning("update %s refused: %s", body.get("version"), exc)
            return {"accepted": False, "state": "failed", "detail": str(exc)[:p.TEXT]}
        if self.task is not None and not self.task.done():
            return {"accepted": False, "state": None,
                    "detail": f"update {self.current.version if self.current else '?'} is under way"}
        self.current = offer
        self.task = asyncio.get_running_loop().create_task(self._run(offer))
        log.info("update %s offered (%d bytes): downloading", offer.version, offer.size)
        return {"accepted": True, "state": "offered", "detail": f"downloading into {self.dir}"}

    def _check(self, body: dict) -> Offer:
        version, sha256, size = body["version"], str(body["sha256"]).lower(), body["size"]
        if body.get("compatible") != COMPATIBLE:
            raise UpdateRefused(f"bundle is for {body.get('compatible')!r}, this appliance is {COMPATIBLE!r}")
        try:
            newer = imageversion.newer(version, self.version)
        except imageversion.VersionError as exc:
            raise UpdateRefused(str(exc)) from None
        if not newer:
            raise UpdateRefused(f"version {version} is not newer than the running {self.version}")
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise UpdateRefused("sha256 is not 64 hex digits")
        if not 0 < size <= p.MAX_BUNDLE_BYTES:
            raise UpdateRefused(f"size {size} outside 1..{p.MAX_BUNDLE_BYTES} bytes")
        if self.booted not in ("A", "B"):
            raise UpdateRefused("this system was not booted from an A/B root slot (rauc.slot= missing)")
        pending = self.pending()
        if pending is not None and pending.activated:
            raise UpdateRefused(f"update {pending.version} is installed and waits for its reboot")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        have = self._have(version)
        free = shutil.disk_usage(self.dir).free
        if free < size - have + SPACE_MARGIN:
            raise UpdateRefused(f"not enough space on {self.dir}: {free} bytes free, the bundle needs "
                                f"{size - have} more plus {SPACE_MARGIN} spare")
        deadline = body.get("deadline_seconds") or 300
        return Offer(version, sha256, size, max(60, min(3600, int(deadline))))

    def _have(self, version: str) -> int:
        try:
            return self._path(f"{version}.raucb.part").stat().st_size
        except OSError:
            return 0

    def _discard(self, version: str) -> None:
        for name in (f"{version}.raucb.part", f"{version}.raucb"):
            self._path(name).unlink(missing_ok=True)

    # ---- download + install

    async def _run(self, offer: Offer) -> None:
        try:
            await self._report(offer.version, "downloading", percent=0)
            bundle = await self._download(offer)
            await self._install(offer, bundle)
        except asyncio.CancelledError:
            raise
        except UpdateRefused as exc:
            log.error("update %s failed: %s", offer.version, exc)
            self._failed(offer.version, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported home; the running slot is untouched
            log.exception("update %s failed", offer.version)
            self._failed(offer.version, f"{type(exc).__name__}: {exc}")
        finally:
            self.installing = False
        await self.flush_outbox()

    def _failed(self, version: str, detail: str) -> None:
        """Nothing of a failed update stays: the bundle (whole or part) goes first, which
        also gives a full /data its space back for the report."""
        self._discard(version)
        self._queue({"version": version, "state": "failed", "detail": detail[:p.TEXT]})

    async def _download(self, offer: Offer) -> Path:
        part = self._path(f"{offer.version}.raucb.part")
        digest = hashlib.sha256()
        have = 0
        if part.exists():  # resume: hash what is there (bounded reads)
            if part.stat().st_size > offer.size:
                part.unlink()
            else:
                with open(part, "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        have += len(block)
                log.info("update %s: resuming the download at %d of %d bytes", offer.version, have, offer.size)
        last_step = have * 100 // offer.size // PERCENT_STEP
        failures = 0
        with open(part, "ab") as out:
            while have < offer.size:
                link = self._link()
                if link is None:
                    await asyncio.sleep(2)
                    continue
                length = min(p.UPDATE_CHUNK_BYTES, offer.size - have)
                try:
                    response = await link.request(p.Op.UPDATE_FETCH, {
                        "version": offer.version, "offset": have, "length": length}, timeout=FETCH_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - socket lost: resume on the next one
                    code = getattr(exc, "code", "")
                    if code in ("not_found", "bad_type"):
                        raise UpdateRefused(f"home stopped serving the bundle: {exc}") from None
                    failures += 1
                    log.warning("update %s: piece at %d failed (%s); resuming", offer.version, have, exc)
                    await asyncio.sleep(min(30, 2 * failures))
                    continue
                data = base64.b64decode(response.body["data"], validate=True)
                if response.body["size"] != offer.size or not data or have + len(data) > offer.size:
                    raise UpdateRefused("home served a bundle that does not match the offer's size")
                out.write(data)
                digest.update(data)
                have += len(data)
                failures = 0
                step = have * 100 // offer.size // PERCENT_STEP
                if step != last_step:
                    last_step = step
                    out.flush()
                    await self._report(offer.version, "downloading", percent=have * 100 // offer.size)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != offer.sha256:
            part.unlink(missing_ok=True)
            raise UpdateRefused("the downloaded bundle's SHA256 does not match the offer; it was deleted")
        bundle = self._path(f"{offer.version}.raucb")
        os.replace(part, bundle)
        return bundle

    async def _install(self, offer: Offer, bundle: Path) -> None:
        self.installing = True
        target = bootslot.other(self.booted)
        self._write_pending(bootslot.Pending(offer.version, target, self.version, False))
        try:
            await self._rauc("install", str(bundle), timeout=INSTALL_TIMEOUT)
        except UpdateRefused:
            self._path("pending.json").unlink(missing_ok=True)
            raise
        finally:
            bundle.unlink(missing_ok=True)
        await self._rauc("status", "mark-active", "other")
        self._write_pending(bootslot.Pending(offer.version, target, self.version, True))
        write_atomic(self._path("trial.json"), json.dumps({"deadline_seconds": offer.deadline_seconds}).encode(),
                     mode=0o644)
        await self._report(offer.version, "installed", slot=target)
        await self._report(offer.version, "rebooting", slot=target)
        log.warning("update %s installed into slot %s: rebooting into it", offer.version, target)
        write_atomic(self._path("reboot"), b"update\n", mode=0o644)

    async def _rauc(self, *args: str, timeout: float = 120.0) -> str:
        what = "rauc " + (args[0] if args[0] == "install" else " ".join(args[:2]))
        proc = await asyncio.create_subprocess_exec(self.rauc, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise UpdateRefused(f"{what} did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (err or out).decode(errors="replace").splitlines() if ln.strip()]
            raise UpdateRefused(f"{what} failed: {lines[-1] if lines else proc.returncode}")
        return out.decode(errors="replace")

    # ---- reports

    def _link(self):
        return next((ln for ln in self.links() if not ln.draining), None)

    async def _report(self, version: str, state: str, **extra) -> None:
        """Progress goes home when a socket is up; states that matter wait in the outbox."""
        body = {"version": version, "state": state, **{k: v for k, v in extra.items() if v is not None}}
        if state == "downloading":
            link = self._link()
            if link is not None:
                try:
                    await link.request(p.Op.UPDATE_REPORT, body, timeout=10)
                except Exception:  # noqa: BLE001 - progress only
                    pass
            return
        self._queue(body)
        await self.flush_outbox()

    async def flush_outbox(self) -> None:
        while self.unsaved:
            link = self._link()
            if link is None:
                return
            try:
                await link.request(p.Op.UPDATE_REPORT, self.unsaved[0], timeout=10)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "code", None) not in ("bad_type", "not_found"):
                    return
                log.warning("home refused update report %s: %s", self.unsaved[0], exc)
            self.unsaved.pop(0)
        items = self._outbox()
        while items:
            link = self._link()
            if link is None:
                return
            try:
                await link.request(p.Op.UPDATE_REPORT, items[0], timeout=10)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "code", None) not in ("bad_type", "not_found"):
                    return  # try again after the next hello
                log.warning("home refused update report %s: %s", items[0], exc)
            items = self._outbox()[1:]
            write_atomic(self._path("outbox.json"), json.dumps(items).encode(), mode=0o600)

    # ---- after boot

    async def after_boot(self, hello_accepted: bool) -> None:
        """Apply :func:`bootslot.after_boot` once per boot (at start, then after each hello)."""
        if self.settled:
            if hello_accepted:
                await self.flush_outbox()
            return
        pending = self.pending()
        decision = bootslot.after_boot(self.booted, pending, self.selfcheck_ok(), hello_accepted)
        if decision.wait:
            return
        try:
            if decision.mark_other_bad:
                await self._rauc("status", "mark-bad", "other")
            if decision.mark_good:
                await self._rauc("status", "mark-good", "booted")
        except UpdateRefused as exc:
            log.error("boot slot bookkeeping failed: %s", exc)
            return
        if decision.report and pending is not None:
            if decision.report == "committed":
                body = {"version": pending.version, "state": "committed", "slot": self.booted,
                        "detail": f"slot {self.booted} runs {self.version}, marked good"}
            else:
                body = {"version": pending.version, "state": "rolled_back", "slot": self.booted,
                        "detail": f"slot {pending.slot} never became healthy within its tries; GRUB "
                                  f"booted slot {self.booted} ({self.version}) again",
                        "journal": self._journal_excerpt(pending.slot)}
            self._queue(body)
            log.warning("update %s: %s", pending.version, decision.report)
        if decision.clear_pending:
            for name in ("pending.json", "trial.json"):
                self._path(name).unlink(missing_ok=True)
        self.settled = True
        if hello_accepted:
            await self.flush_outbox()

    def _journal_excerpt(self, slot: str) -> str:
        """The failed slot's last boot as tether-boot-journal.service kept it at shutdown (bounded)."""
        try:
            with open(self._path(f"last-boot-{slot}.txt"), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - p.JOURNAL_TEXT))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return f"(no journal kept for slot {slot})"
        return text[-p.JOURNAL_TEXT:]

    def status(self) -> dict:
        pending = self.pending()
        return {"image_version": self.version, "boot_slot": self.booted,
                "pending": asdict(pending) if pending else None,
                "downloading": self.current.version if self.task and not self.task.done() else None}




def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return ""
