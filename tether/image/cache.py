"""The build cache (images/.cache/): a stage's outputs found by a key of its declared inputs.

One rule for every cached stage (the base disk, the accelerator probe, the
dependency wheels, the provisioned layer), as osbuild caches a stage's tree
by the hash of its inputs:

* an entry is named `<kind>-<key[:16]><suffix>`, one file or directory per
  declared output suffix (the base disk has two: `.raw` and `.vmlinuz`);
* an entry is there when all its outputs are; a stage writes them under
  temporary names (`.<name>.tmp-<pid>`, never matched as an entry) and they
  are renamed into place only when the stage finished, so an interrupted
  build never leaves an entry that looks complete;
* publishing an entry drops the entries of the same kind with another key:
  each is up to GiBs, and another key never comes back without its inputs
  changing back.

The key is the stage's business (a SHA256 hex of its inputs); the cache only
names, finds and publishes. Same file system as images/.work, so a disk made
there moves into the cache by rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    """The cached outputs of one stage for one key."""

    cache_dir: Path
    kind: str
    key: str
    suffixes: tuple[str, ...] = ("",)

    @property
    def short(self) -> str:
        return self.key[:16]

    def path(self, suffix: str | None = None) -> Path:
        """The output with `suffix` (default: the first declared one)."""
        suffix = self.suffixes[0] if suffix is None else suffix
        if suffix not in self.suffixes:
            raise KeyError(f"{self.kind} declares no output {suffix!r}")
        return self.cache_dir / f"{self.kind}-{self.short}{suffix}"

    def ready(self) -> bool:
        return all(self.path(s).exists() for s in self.suffixes)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[dict[str, Path]]:
        """Temporary paths per suffix to write; renamed into place when the block succeeds.

        Nothing is created: the stage makes each output (a file or a
        directory) at its temporary path. On an exception the temporary
        outputs are removed and the cache is left as it was.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = {s: self.cache_dir / f".{self.path(s).name}.tmp-{os.getpid()}" for s in self.suffixes}
        for path in tmp.values():
            _remove(path)
        try:
            yield tmp
            for suffix, path in tmp.items():
                if not path.exists():
                    raise FileNotFoundError(f"the {self.kind} stage wrote no {path.name}")
                _remove(self.path(suffix))
                os.replace(path, self.path(suffix))
        finally:
            for path in tmp.values():
                _remove(path)
        self.prune()

    def prune(self) -> list[Path]:
        """Remove the entries of this kind with another key."""
        mine = {self.path(s) for s in self.suffixes}
        gone = []
        for suffix in self.suffixes:
            for old in self.cache_dir.glob(f"{self.kind}-*{suffix}"):
                if old not in mine:
                    _remove(old)
                    gone.append(old)
        return gone
