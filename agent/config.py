"""The agent's configuration: verified before use, last good kept on disk.

Home pushes signed documents (:mod:`tether.configsig`); this store verifies each
one against home's config-signing key (learnt over the pinned, mutually
authenticated channel at enrollment and kept as ``config-key.pem``), refuses
rollbacks, checks that every sealed secret opens with this instance's key, and
only then replaces ``config.json`` on disk atomically. The file holds the
*signed, still sealed* document: secrets are opened in memory only
(:attr:`ConfigStore.secrets_open`) and never written in clear.

At start the last good file is verified again (a hand-edited or corrupted copy
is refused, never used), so the agent keeps serving from it while home is away.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tether.atomicfile import write_atomic
from tether import configsig, sealing


log = logging.getLogger("tether.agent.config")

CONFIG_FILE = "config.json"
CONFIG_KEY_FILE = "config-key.pem"


@dataclass(frozen=True)
class Applied:
    """Outcome of a push: the version now in use and whether it changed."""

    version: int
    changed: bool


class ConfigStore:
    """Current configuration of this instance; one per agent process."""

    def __init__(self, state_dir: Path, connector: str,
                 sealing_key: sealing.X25519PrivateKey) -> None:
        self.state_dir = state_dir
        self.connector = connector
        self.sealing_key = sealing_key
        self.instance_id: str | None = None
        self.current: configsig.SignedConfig | None = None
        self.secrets_open: dict | None = None
        self.last_error: configsig.ConfigError | None = None

    @property
    def version(self) -> int | None:
        return self.current.version if self.current else None

    # ---- verification key

    def set_verify_key(self, pem: str | bytes) -> bool:
        """Store home's config-signing public key (sent in enroll/hello responses).

        Returns True when the configuration in use was signed by another key (a
        document planted in the state directory with its own key, or home's key
        rotated): it is dropped, the agent then reports no configuration and home
        pushes its own.
        """
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = configsig.load_public_key(data)  # refuse garbage before writing it
        path = self.state_dir / CONFIG_KEY_FILE
        if not path.exists() or path.read_bytes() != data:
            write_atomic(path, data, mode=0o644)
        if self.current is None or self.current.key_id == configsig.key_id(key):
            return False
        self.last_error = configsig.ConfigSignatureError(
            f"configuration v{self.current.version} was not signed by home's key "
            f"{configsig.key_id(key)}; dropped, waiting for home's push")
        log.error("%s", self.last_error, extra={"tether_config_version": self.current.version})
        self.current, self.secrets_open = None, None
        return True

    def verify_key(self):
        path = self.state_dir / CONFIG_KEY_FILE
        if not path.exists():
            raise configsig.ConfigSignatureError(
                "home's config-signing key is unknown (not enrolled yet); the agent "
                "learns it from home's enroll/hello response")
        return configsig.load_public_key(path.read_bytes())

    # ---- documents

    def _verify(self, document: object,
                min_version: int | None) -> tuple[configsig.SignedConfig, dict]:
        signed = configsig.verify_config(self.verify_key(), document, connector=self.connector,
                                         instance_id=self.instance_id, min_version=min_version)
        try:
            opened = configsig.unseal_secrets(
                signed.config, lambda text, aad: sealing.unseal(self.sealing_key, text, aad))
        except sealing.SealingError as exc:
            raise configsig.ConfigError(
                f"a secret in configuration v{signed.version} does not open with this "
                f"instance's key ({exc}); home must seal it to this instance") from None
        return signed, opened

    def load_last_good(self) -> bool:
        """Use the configuration on disk if it still verifies; True when loaded."""
        path = self.state_dir / CONFIG_FILE
        if not path.exists():
            return False
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            self.current, self.secrets_open = self._verify(document, None)
        except (OSError, ValueError) as exc:  # ConfigError is a ValueError
            self.last_error = exc if isinstance(exc, configsig.ConfigError) else \
                configsig.ConfigFormatError(str(exc))
            log.error("last good configuration %s refused: %s; waiting for home to push "
                      "a new one", path, exc, extra={"tether_path": str(path)})
            return False
        log.info("running from last good configuration v%s", self.current.version,
                 extra={"tether_config_version": self.current.version})
        return True

    def apply(self, document: object, *, replace: bool = False) -> Applied:
        """Verify a pushed document; on success make it current and persist it.

        ``replace``: home said the version in use is not one it signed for this
        instance (``config.push`` ``replace``); the rollback check is skipped, the
        signature, target and secrets are checked as always. A document of the same
        version replaces the current one when its key or content differs.

        Raises :class:`configsig.ConfigError` (its ``code`` is the protocol error
        code) and leaves the current configuration and the file untouched.
        """
        try:
            signed, opened = self._verify(document, None if replace else self.version)
        except configsig.ConfigError as exc:
            self.last_error = exc
            raise
        current = self.current
        if current is not None and signed.version == current.version \
                and signed.key_id == current.key_id and opened == self.secrets_open:
            return Applied(signed.version, changed=False)
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
        write_atomic(self.state_dir / CONFIG_FILE, data, mode=0o600)
        self.current, self.secrets_open, self.last_error = signed, opened, None
        return Applied(signed.version, changed=True)

    def channel_overrides(self) -> dict:
        """The ``agent`` section (sockets, socket_ttl_s, proxy) of the configuration."""
        if not self.secrets_open:
            return {}
        section = self.secrets_open.get("agent")
        return section if isinstance(section, dict) else {}
