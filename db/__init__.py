"""gemmtune.db: SQLAlchemy models, store, migrations, profiles (imports nothing else of gemmtune).

`Store.open(url)` is the entry point shared by the tuner (writes) and the runtime (reads);
`profiles` moves entries between databases as validated JSON; `header` renders C `#define`s.
The store and profile modules load SQLAlchemy, so they are imported on first use.
"""

from __future__ import annotations

if __name__ != "gemmtune.db":  # imported as top-level `db`: not ours to answer
    from gemmtune._toplevel import hand_over

    hand_over(__name__, __file__)
else:
    from typing import Any

    from .errors import (
        DatabaseCorruptError,
        DatabaseError,
        DatabaseLockedError,
        DatabasePathError,
        DatabaseReadOnlyError,
        DatabaseUnavailableError,
        ProfileError,
        SchemaTooNewError,
        SchemaUpgradeRequiredError,
    )
    from .paths import ENV_VAR, default_db_path, default_url, resolve_url

    _LAZY = {
        "Store": "store",
        "TunedEntry": "entry",
        "ImportResult": "entry",
        "Profile": "profiles",
        "ProfileEntry": "entry",
        "ProfileValidator": "profiles",
        "read_profile": "profiles",
        "parse_profile": "profiles",
        "import_profile": "profiles",
        "build_profile": "profiles",
        "render_header": "header",
    }

    __all__ = [
        "ENV_VAR",
        "DatabaseCorruptError",
        "DatabaseError",
        "DatabaseLockedError",
        "DatabasePathError",
        "DatabaseReadOnlyError",
        "DatabaseUnavailableError",
        "ProfileError",
        "SchemaTooNewError",
        "SchemaUpgradeRequiredError",
        "default_db_path",
        "default_url",
        "resolve_url",
        *_LAZY,
    ]


    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'gemmtune.db' has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(f".{module}", __name__), name)
