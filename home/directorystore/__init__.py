"""Home's directory store: the users and groups that the connectors' sync fills.

One SQLite file (``identity.db``), written by the directory change stream
(:mod:`tether.home.directories`) and read by the CLI, the SCIM API and the
status page. The package is split by concern:

* :mod:`.store` -- :class:`DirectoryStore`: opening, transactions and the reads;
* :mod:`.apply` -- the write path of one ``directory.changes`` batch;
* :mod:`.members` -- member deltas and the membership reads;
* :mod:`.records` -- a stream record as rows and back, :class:`DirectoryStoreError`;
* :mod:`.schema` -- tables, indexes and the migration;
* :mod:`.export` -- the CSV export.

Every SQL statement about synced users and groups lives in this package.
"""

from tether.home.directorystore.export import CSV_MULTI, csv_columns
from tether.home.directorystore.records import BatchResult, DirectoryStoreError, dn_key
from tether.home.directorystore.schema import SCHEMA_VERSION
from tether.home.directorystore.store import RESTORE_HINT, DirectoryStore

__all__ = ["CSV_MULTI", "RESTORE_HINT", "SCHEMA_VERSION", "BatchResult", "DirectoryStore",
           "DirectoryStoreError", "csv_columns", "dn_key"]
