"""`config_key` becomes TEXT: a config's canonical spelling outgrew VARCHAR(256).

`config_key` is every field of the config, sorted, as `name=value` pairs (`db.entry.config_key`).
With the wgmma and stream kernel families the config has twenty fields and the spelling runs past
256 characters: PostgreSQL refused every such row ("value too long for type character varying").
SQLite never enforced the length, so its rows are unchanged either way.

Downgrading makes it VARCHAR(256) again and, on PostgreSQL, cuts longer keys to 256 characters:
the key is derived from the `config` column, which keeps the whole config.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gemmtune_tuned_configs") as batch:
        batch.alter_column("config_key", existing_type=sa.String(256), type_=sa.Text(),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("gemmtune_tuned_configs") as batch:
        batch.alter_column("config_key", existing_type=sa.Text(), type_=sa.String(256),
                           existing_nullable=False,
                           postgresql_using="left(config_key, 256)")
