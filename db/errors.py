"""Typed errors of the database layer.

`gemmtune.db` may not import `gemmtune.kernels` (layering), so these do not derive from
`GemmtuneError`; the CLI and the runtime catch `DatabaseError` / `ProfileError` explicitly.
Every message is one line that names the database (or profile field) and says what to do, so the
CLI can print it as is and the runtime can log it as its single warning.
"""

from __future__ import annotations


class DatabaseError(Exception):
    """The tuning database cannot be opened, read or written."""


class DatabasePathError(DatabaseError):
    """The URL points at something that cannot hold a database (a directory, a missing folder)."""


class DatabaseCorruptError(DatabaseError):
    """The file exists but is not an intact SQLite database (garbage, truncated, malformed)."""


class DatabaseReadOnlyError(DatabaseError):
    """A write was needed but the file, its folder or the server refuses writes."""


class SchemaUpgradeRequiredError(DatabaseReadOnlyError):
    """Opened read-only, but the schema is older than this code and would need an upgrade."""


class DatabaseLockedError(DatabaseError):
    """Another process kept the database locked for longer than we are willing to wait."""


class DatabaseUnavailableError(DatabaseError):
    """The server behind the URL cannot be reached or refused the login, or the driver is missing."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer gemmtune than this one; we refuse to touch it."""


class ProfileError(Exception):
    """A profile file is unreadable or fails validation. `field` is the JSON path at fault
    (e.g. `entries[3].config`), empty when the whole file is at fault."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field
