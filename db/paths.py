"""Where the tuning database lives: `--db URL` > `GEMMTUNE_DB` > the platformdirs user-data path.

A plain filesystem path is accepted wherever a URL is (it means SQLite), because that is what
people type. Only the *default* location gets its folder created on demand: an explicit path
into a folder that does not exist is far more often a typo than a wish.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "GEMMTUNE_DB"
"""Environment variable holding a SQLAlchemy URL (or a path) of the tuning database."""

DB_FILENAME = "tuning.db"


def default_db_path() -> Path:
    """`<user data dir>/gemmtune/tuning.db` (e.g. `~/.local/share/gemmtune/tuning.db` on Linux)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("gemmtune", appauthor=False)) / DB_FILENAME


def default_url() -> str:
    return sqlite_url(default_db_path())


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path).expanduser().absolute()}"


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the argument, else `GEMMTUNE_DB`, else the default SQLite file."""
    chosen = url if url else os.environ.get(ENV_VAR, "").strip()
    if not chosen:
        return default_url()
    if "://" not in chosen:
        return sqlite_url(chosen)
    return chosen


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
