"""Directory operations (LDAP / Active Directory) the agent performs for home.

The call boundary is `DirectoryService(config_dict)`; results are plain dicts,
failures `DirectoryError` (stable `code`, `message`, `hint`). Changes for home
go through `Spool` (ordered, fsync'd, removed on ack).
"""

from .errors import DirectoryConfigError, CursorExpired, DirectoryError  # noqa: F401
from .follow import Follower  # noqa: F401
from .service import DirectoryService  # noqa: F401
from .spool import Spool, SpoolError  # noqa: F401
