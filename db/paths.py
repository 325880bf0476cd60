"""Where the tuning database lives: `--db URL` > `GEMMTUNE_DB` > the platformdirs user-data path.

A plain filesystem path is accepted wherever a URL is (it means SQLite), because that is what
people type. Only the *default* location gets its folder created on demand: an explicit path
into a folder that does not exist is far more often a typo than a wish.

Every value has exactly one outcome, decided here before anything opens a file (so the CLI,
the runtime and Optuna's storage agree, and a mistake never leaves a stray file behind):

- empty or blank: as if unset (the next source, finally the default file);
- a URL (`scheme://…`) whose scheme SQLAlchemy knows: used as given;
- a path (it has a folder part, starts with `~` or `.`, or ends in a database suffix such as
  `.db`): that SQLite file;
- refused with `DatabasePathError`: an in-memory SQLite database (`sqlite://`,
  `sqlite:///:memory:`, `:memory:`, `mode=memory`), because tuning results must outlive the
  process and every connection of a pool would see its own empty copy; an unknown scheme; a
  URL missing its `//`; a bare word such as `tuning` or `postgres` (almost always a
  mistake, and as a path it would create a file of that name in the current folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DatabasePathError

ENV_VAR = "GEMMTUNE_DB"
"""Environment variable holding a SQLAlchemy URL (or a path) of the tuning database."""

DB_FILENAME = "tuning.db"

PATH_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")
"""File name endings that make a bare name (no folder part) a database path: `tuning.db`."""

_SCHEME_ONLY = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # `sqlite:/x`, `postgresql:host` (not C:\)

_URL_HELP = ("give a file path (./tuning.db, /srv/gemmtune.db) or a URL "
             "(sqlite:////srv/gemmtune.db, postgresql+psycopg://user@host/gemmtune)")


def default_db_path() -> Path:
    """`<user data dir>/gemmtune/tuning.db` (e.g. `~/.local/share/gemmtune/tuning.db` on Linux)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("gemmtune", appauthor=False)) / DB_FILENAME


def default_url() -> str:
    return sqlite_url(default_db_path())


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path).expanduser().absolute()}"


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the argument, else `GEMMTUNE_DB`, else the default SQLite file.

    Blank values count as unset. Raises `DatabasePathError` (one line naming the value and
    where it came from) for every value the module docstring lists as refused."""
    if url is not None and url.strip():
        chosen, origin = url.strip(), f"database {url.strip()!r}"
    else:
        chosen = os.environ.get(ENV_VAR, "").strip()
        origin = f"{ENV_VAR}={chosen!r}"
    if not chosen:
        return default_url()
    resolved = _normalise(chosen, origin)
    if is_memory_url(resolved):
        raise DatabasePathError(
            f"{origin} is an in-memory SQLite database: tuning results would vanish when the "
            f"process ends; {_URL_HELP}")
    return resolved


def _normalise(value: str, origin: str) -> str:
    if value == ":memory:":
        return "sqlite:///:memory:"
    if "://" in value:
        _check_url(value, origin)
        return value
    if _SCHEME_ONLY.match(value):
        raise DatabasePathError(f"{origin} looks like a URL but lacks '//' after the scheme; "
                                f"{_URL_HELP}")
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    is_path = (any(s in value for s in seps) or value.startswith(("~", "."))
               or value.lower().endswith(PATH_SUFFIXES))
    if not is_path:
        raise DatabasePathError(
            f"{origin} is neither a URL nor a file path (a bare name would become a file of that "
            f"name in the current folder); {_URL_HELP}")
    return sqlite_url(value)


def _check_url(value: str, origin: str) -> None:
    """The URL parses and SQLAlchemy has a dialect for its scheme (the driver module itself is
    imported only when the database is opened, where a missing one gets its install hint)."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        u = make_url(value)
    except sa_exc.ArgumentError:
        raise DatabasePathError(f"{origin} is not a database URL; {_URL_HELP}") from None
    try:
        u.get_dialect()
    except sa_exc.NoSuchModuleError:
        hint = " (PostgreSQL is postgresql://, or postgresql+psycopg://)" \
            if u.drivername.split("+")[0] == "postgres" else ""
        raise DatabasePathError(f"{origin}: unknown database scheme {u.drivername!r}{hint}; "
                                f"{_URL_HELP}") from None


def is_memory_url(url: str) -> bool:
    """Whether a SQLite URL names an in-memory database (no file behind it)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return False
    db = u.database or ""
    if db in ("", ":memory:") or u.query.get("mode") == "memory":
        return True
    if db.startswith("file:"):  # a SQLite URI filename: file:NAME?mode=memory&...
        name, _, query = db[5:].partition("?")
        return name in ("", ":memory:") or "mode=memory" in query.split("&")
    return False


def is_default_url(url: str) -> bool:
    return url == default_url()


def sqlite_path(url: str) -> Path | None:
    """Filesystem path of a file-backed SQLite URL, None for memory databases and other backends."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)
