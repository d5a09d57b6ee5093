"""Upload a raw disk as an EBS snapshot through the EBS direct APIs.

Why direct APIs: no S3 bucket and no VM Import service role are needed, only
`ebs:StartSnapshot/PutSnapshotBlock/CompleteSnapshot`. The disk goes up in
524288-byte blocks, several at a time; blocks that are all zero (holes of the
sparse file, and space zeroed by sysprep) are never sent, because EBS reads a
missing block as zeros.

An interrupted upload resumes: every acknowledged block is appended to a
journal next to the image (`<raw>.ebs-upload.jsonl`: a header line with the
snapshot id, then one line per done block with its checksum), so the next run
sends only what is missing and can still compute the aggregated checksum.

The emulator used in tests (moto) checks neither block sizes nor checksums,
so every request is validated here before it is sent.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from tether.atomicfile import write_atomic
from tether.image.errors import BuildError

BLOCK_SIZE = 524288
GIB = 1024 ** 3
ZERO_BLOCK = bytes(BLOCK_SIZE)
JOURNAL_FORMAT = "tether-ebs-upload"
# Minutes a pending snapshot may sit idle before EBS cancels it: long enough
# to resume an upload the next working day.
SNAPSHOT_TIMEOUT_MIN = 1440


class UploadError(BuildError):
    """The snapshot upload failed; the message says whether rerunning resumes it."""


@dataclass
class UploadStats:
    """What one upload run did, for progress lines and bench/ami.py."""

    snapshot_id: str = ""
    total_blocks: int = 0
    sent_blocks: int = 0
    resumed_blocks: int = 0
    zero_blocks: int = 0
    sent_bytes: int = 0
    seconds: float = 0.0
    resumed: bool = False

    @property
    def zero_share(self) -> float:
        return self.zero_blocks / self.total_blocks if self.total_blocks else 0.0


# ------------------------------------------------------------ checksums


def block_checksum(data: bytes) -> str:
    """Base64 SHA256 of one block, as PutSnapshotBlock's Checksum wants it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def aggregate_checksum(checksums: dict[int, str]) -> str:
    """CompleteSnapshot's LINEAR checksum: SHA256 over the per-block digests in index order."""
    digest = hashlib.sha256()
    for index in sorted(checksums):
        digest.update(base64.b64decode(checksums[index]))
    return base64.b64encode(digest.digest()).decode()


def validate_put(params: dict, volume_blocks: int) -> None:
    """Refuse a PutSnapshotBlock request EBS would reject (moto would not)."""
    data = params["BlockData"]
    if len(data) != BLOCK_SIZE or params["DataLength"] != BLOCK_SIZE:
        raise UploadError(f"internal error: block {params['BlockIndex']} is {len(data)} bytes "
                          f"(DataLength {params['DataLength']}), EBS takes exactly {BLOCK_SIZE}")
    if not 0 <= params["BlockIndex"] < volume_blocks:
        raise UploadError(f"internal error: block index {params['BlockIndex']} outside the "
                          f"{volume_blocks}-block volume")
    if params["ChecksumAlgorithm"] != "SHA256" or params["Checksum"] != block_checksum(data):
        raise UploadError(f"internal error: checksum of block {params['BlockIndex']} "
                          "does not match its data")


def validate_complete(params: dict, done: dict[int, str]) -> None:
    """Refuse a CompleteSnapshot whose count or aggregate disagrees with the journal."""
    if params["ChangedBlocksCount"] != len(done):
        raise UploadError(f"internal error: ChangedBlocksCount {params['ChangedBlocksCount']} "
                          f"but {len(done)} blocks were written")
    if params["Checksum"] != aggregate_checksum(done):
        raise UploadError("internal error: aggregated checksum does not match the blocks")


# ------------------------------------------------------------ the disk


def volume_gib(size: int) -> int:
    """Smallest whole number of GiB that holds `size` bytes (EBS sizes are whole GiB)."""
    return max(1, -(-size // GIB))


def data_blocks(fd: int, size: int) -> Iterator[int]:
    """Indexes of blocks that touch allocated data; holes are skipped without reading.

    Uses SEEK_DATA/SEEK_HOLE; where the filesystem cannot say, every block is
    a candidate (the zero check after reading still skips empty ones).
    """
    offset, last = 0, -1
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # the filesystem cannot tell: read everything
                yield from range(max(offset // BLOCK_SIZE, last + 1), -(-size // BLOCK_SIZE))
            return  # ENXIO: no data after offset
        for index in range(max(start // BLOCK_SIZE, last + 1), -(-end // BLOCK_SIZE)):
            yield index
            last = index
        offset = end


def read_block(fd: int, index: int) -> bytes:
    """Block `index`, zero-padded to BLOCK_SIZE at the end of the disk."""
    data = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
    return data if len(data) == BLOCK_SIZE else data.ljust(BLOCK_SIZE, b"\0")


# ------------------------------------------------------------ the journal


@dataclass
class Journal:
    """The resume file: which snapshot, and which blocks EBS has acknowledged."""

    path: Path
    snapshot_id: str = ""
    done: dict[int, str] = field(default_factory=dict)
    completed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @staticmethod
    def path_for(raw: Path) -> Path:
        return raw.with_name(raw.name + ".ebs-upload.jsonl")

    @classmethod
    def load(cls, raw: Path, identity: dict) -> "Journal | None":
        """The journal for this very disk file, or None (absent, other disk, unreadable)."""
        path = cls.path_for(raw)
        try:
            text = _drop_torn_tail(path)
            lines = text.splitlines()
            header = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            return None
        if header.get("format") != JOURNAL_FORMAT or header.get("disk") != identity:
            return None
        journal = cls(path, header["snapshot_id"])
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: that block is simply sent again
            if "i" in entry:
                journal.done[int(entry["i"])] = entry["sha256"]
            journal.completed = journal.completed or entry.get("completed", False)
        return journal

    @classmethod
    def create(cls, raw: Path, identity: dict, snapshot_id: str) -> "Journal":
        journal = cls(cls.path_for(raw), snapshot_id)
        header = {"format": JOURNAL_FORMAT, "snapshot_id": snapshot_id, "disk": identity,
                  "block_size": BLOCK_SIZE}
        write_atomic(journal.path, json.dumps(header) + "\n", mode=0o644)
        return journal

    def record(self, index: int, checksum: str) -> None:
        """Append one acknowledged block; flushed so a crash right after keeps it."""
        with self._lock:
            self.done[index] = checksum
            self._append({"i": index, "sha256": checksum})

    def mark_completed(self) -> None:
        with self._lock:
            self.completed = True
            self._append({"completed": True})

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _drop_torn_tail(path: Path) -> str:
    """Cut a last line the crash left unfinished, so new entries start on a line of their own."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        with open(path, "r+") as handle:
            handle.truncate(len(text.encode()))
    return text


def disk_identity(raw: Path) -> dict:
    """What must not change between an interrupted run and its resumption."""
    st = raw.stat()
    return {"name": raw.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------ the upload


@dataclass
class SnapshotUploader:
    """Puts one raw disk into one EBS snapshot; `ebs` and `ec2` are boto3 clients."""

    ebs: object
    ec2: object
    workers: int = 8
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    progress: TextIO | None = sys.stderr

    def upload(self, raw: Path) -> UploadStats:
        """Upload `raw` (resuming a journaled run of the same file) and return figures."""
        raw = Path(raw)
        if not raw.is_file():
            raise UploadError(f"{raw} not found: build the image first (make image)")
        started = time.monotonic()
        identity = disk_identity(raw)
        journal, stats = self._journal(raw, identity)
        if not journal.completed:
            self._send_blocks(raw, journal, stats, identity["size"])
            self._complete(journal)
        self._wait_completed(journal.snapshot_id)
        stats.seconds = time.monotonic() - started
        return stats

    def _journal(self, raw: Path, identity: dict) -> tuple[Journal, UploadStats]:
        journal = Journal.load(raw, identity)
        if journal and self._snapshot_usable(journal.snapshot_id):
            self._say(f"ebs: resuming snapshot {journal.snapshot_id}: "
                      f"{len(journal.done)} blocks already uploaded")
            return journal, UploadStats(journal.snapshot_id, resumed=True,
                                        resumed_blocks=len(journal.done))
        response = self._call(self.ebs.start_snapshot, "StartSnapshot",
                              VolumeSize=volume_gib(identity["size"]),
                              Timeout=SNAPSHOT_TIMEOUT_MIN,
                              Description=self.description or raw.name,
                              Tags=[{"Key": k, "Value": v} for k, v in self.tags.items()])
        snapshot_id = response["SnapshotId"]
        self._say(f"ebs: started snapshot {snapshot_id} "
                  f"({volume_gib(identity['size'])} GiB volume)")
        return Journal.create(raw, identity, snapshot_id), UploadStats(snapshot_id)

    def _snapshot_usable(self, snapshot_id: str) -> bool:
        """False when EBS no longer has the journaled snapshot (expired, failed, deleted)."""
        try:
            snaps = self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except ClientError:
            snaps = []
        if not snaps or snaps[0].get("State") == "error":
            self._say(f"ebs: snapshot {snapshot_id} from the interrupted upload is gone; "
                      "starting over")
            return False
        return True

    def _send_blocks(self, raw: Path, journal: Journal, stats: UploadStats, size: int) -> None:
        volume_blocks = volume_gib(size) * GIB // BLOCK_SIZE
        stats.total_blocks = -(-size // BLOCK_SIZE)
        errors: list[str] = []
        fd = os.open(raw, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="ebs-put") as pool:
                pending: set[Future] = set()
                candidates = 0
                for index in data_blocks(fd, size):
                    candidates += 1
                    if index in journal.done:
                        continue
                    data = read_block(fd, index)
                    if data == ZERO_BLOCK:
                        stats.zero_blocks += 1
                        continue
                    if len(pending) >= 2 * self.workers:
                        pending = self._drain(pending, errors, FIRST_COMPLETED)
                    if errors:
                        break
                    pending.add(pool.submit(self._put, journal, index, data, volume_blocks))
                    stats.sent_blocks += 1
                    stats.sent_bytes += BLOCK_SIZE
                self._drain(pending, errors, None)
                stats.zero_blocks += stats.total_blocks - candidates
        finally:
            os.close(fd)
        if errors:
            raise UploadError(f"{len(errors)} block upload(s) failed, first: {errors[0]}. "
                              f"{len(journal.done)} blocks are saved in {journal.path}: "
                              "rerun the same command to resume (if it keeps failing on a "
                              "snapshot EBS no longer accepts, delete that file to start over)")

    def _drain(self, pending: set[Future], errors: list[str], when) -> set[Future]:
        done, rest = wait(pending, return_when=when or ALL_COMPLETED)
        for future in done:
            if future.exception() is not None:
                errors.append(str(future.exception()))
        return rest

    def _put(self, journal: Journal, index: int, data: bytes, volume_blocks: int) -> None:
        params = {"SnapshotId": journal.snapshot_id, "BlockIndex": index, "BlockData": data,
                  "DataLength": BLOCK_SIZE, "Checksum": block_checksum(data),
                  "ChecksumAlgorithm": "SHA256"}
        validate_put(params, volume_blocks)
        self._call(self.ebs.put_snapshot_block, f"PutSnapshotBlock {index}", **params)
        journal.record(index, params["Checksum"])
        done = len(journal.done)
        if done % 256 == 0:
            self._say(f"ebs: {done} blocks uploaded ({done * BLOCK_SIZE / 2**20:.0f} MiB)")

    def _complete(self, journal: Journal) -> None:
        params = {"SnapshotId": journal.snapshot_id, "ChangedBlocksCount": len(journal.done),
                  "Checksum": aggregate_checksum(journal.done), "ChecksumAlgorithm": "SHA256",
                  "ChecksumAggregationMethod": "LINEAR"}
        validate_complete(params, journal.done)
        self._call(self.ebs.complete_snapshot, "CompleteSnapshot", **params)
        journal.mark_completed()
        self._say(f"ebs: snapshot {journal.snapshot_id} sealed with {len(journal.done)} blocks")

    def _wait_completed(self, snapshot_id: str) -> None:
        """EBS seals asynchronously: wait until EC2 reports the snapshot completed."""
        try:
            self.ec2.get_waiter("snapshot_completed").wait(
                SnapshotIds=[snapshot_id], WaiterConfig={"Delay": 5, "MaxAttempts": 360})
        except (BotoCoreError, ClientError) as exc:
            raise UploadError(f"snapshot {snapshot_id} did not complete: {exc}; check it in the "
                              "EC2 console, then rerun to register the AMI") from None

    def _call(self, method, what: str, **params):
        try:
            return method(**params)
        except (BotoCoreError, ClientError) as exc:
            raise UploadError(f"{what} failed: {exc}") from None

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line + "\n")
            self.progress.flush()
