"""gemmtune.db: SQLAlchemy models, store, migrations, profiles (imports nothing else of gemmtune)."""
