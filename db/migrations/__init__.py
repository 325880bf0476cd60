"""Alembic migration environment of gemmtune (own version table)."""
