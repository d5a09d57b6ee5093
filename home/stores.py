"""The narrow interfaces of home's state, one per concern.

Why interfaces: home runs on one SQLite file today (:class:`tether.home.store.Store`
implements all of these), and must later run as replicas sharing PostgreSQL. A
part of home is typed against the interface of the state it uses (the directory
router against :class:`Routing` and :class:`Configurations`, the certificate
gate against :class:`Certificates` and :class:`Instances`), so a second
implementation has to provide exactly these methods and nothing a caller
reached around them. The synced users and groups have their own store
(:class:`tether.home.directorystore.DirectoryStore`), as do the API's clients
(:mod:`tether.home.apistore`) and whole-image updates (:mod:`tether.home.updatestore`).

Rows are plain dicts with the column names of docs/CONTRACTS.md; the methods
never hand out a connection or a cursor. :class:`AgentRecords` holds the socket
table, which is where replicas will learn which of them holds an agent's socket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class Routing(Protocol):
    """Connectors, the clusters they serve and each cluster's routing policy."""

    def add_connector(self, name: str, cluster: str, max_instances: int) -> None: ...

    def update_connector(self, name: str, cluster: str | None,
                         max_instances: int | None) -> None: ...

    def connector(self, name: str) -> dict: ...

    def connectors(self) -> list[dict]: ...

    def set_cluster_policy(self, name: str, policy: str, primary: str | None) -> dict: ...

    def cluster_policy(self, name: str) -> dict: ...

    def clusters(self) -> list[dict]: ...


class Configurations(Protocol):
    """Each connector's configuration, in numbered versions."""

    def add_config(self, connector: str, config: dict) -> int: ...

    def config(self, connector: str, version: int | None = None) -> dict | None: ...

    def config_versions(self, connector: str) -> list[int]: ...


class Certificates(Protocol):
    """Every certificate home's CA issued (image and instance), and revocations."""

    def add_cert(self, serial: str, kind: str, subject: str, not_before: float,
                 not_after: float, *, connector: str | None = None, image_id: str | None = None,
                 instance_id: str | None = None) -> None: ...

    def cert(self, serial: str) -> dict | None: ...

    def revoke_cert(self, serial: str, reason: str) -> dict: ...

    def valid_instance_certs(self, instance_id: str, now: float | None = None) -> list[dict]: ...

    def revoke_instance_certs(self, instance_id: str, keep: Iterable[str],
                              reason: str) -> list[str]: ...

    def certs(self, **where: Any) -> list[dict]: ...


class Instances(Protocol):
    """Images, the instances enrolled from them and the clones refused."""

    def add_image(self, image_id: str, connector: str, fingerprint: str, cert_serial: str,
                  home_urls: list[str], max_instances: int | None = None) -> None: ...

    def image(self, image_id: str) -> dict | None: ...

    def images(self) -> list[dict]: ...

    def instance(self, instance_id: str) -> dict | None: ...

    def instance_for_machine(self, image_id: str, fingerprint: str) -> dict | None: ...

    def count_instances(self, image_id: str) -> int: ...

    def instances(self, connector: str | None = None) -> list[dict]: ...

    def add_instance(self, instance_id: str, image_id: str, connector: str, fingerprint: str,
                     machine: dict, sealing_public_key: str, key_spki: str | None = None) -> None: ...

    def reenroll_instance(self, instance_id: str, machine: dict, sealing_public_key: str,
                          key_spki: str | None = None) -> None: ...

    def set_instance_key(self, instance_id: str, key_spki: str) -> None: ...

    def reset_instance(self, instance_id: str) -> None: ...

    def set_instance_cert(self, instance_id: str, serial: str, not_after: float) -> None: ...

    def record_clone(self, image_id: str, connector: str, fingerprint: str, machine: dict,
                     *, reason: str = "limit", instance_id: str | None = None,
                     max_rows: int = 100) -> str: ...

    def count_clones(self, image_id: str) -> int: ...

    def clones(self) -> list[dict]: ...


class AgentRecords(Protocol):
    """What connected agents reported (hello, heartbeats, configuration state, sockets):
    records only, written best-effort (:mod:`tether.home.bookkeeping`)."""

    def record_hello(self, instance_id: str, agent_version: str, selfcheck: dict | None,
                     listening: list | None, config_version: int | None) -> None: ...

    def record_heartbeats(self, beats: dict[str, dict]) -> None: ...

    def record_config_state(self, instance_id: str, version: int | None, status: str) -> None: ...

    def confirm_config(self, instance_id: str, version: int) -> None: ...

    def clear_sockets(self) -> None: ...

    def add_socket(self, socket_id: str, role: str, connector: str, image_id: str | None,
                   instance_id: str | None, peer: str, socket_index: int | None) -> None: ...

    def remove_socket(self, socket_id: str) -> None: ...

    def sockets(self) -> list[dict]: ...
