"""Tuned configs carry a plan over M bands: a nullable JSON column `bands`.

NULL means one band of `config` (every row written before this revision), so upgrading touches
no row. Downgrading drops the column: a banded row keeps `config`, its last band's config (the
plan's `MAX_Q_GEMM_ROWS` and a variant the plan runs), which is what the older code serves.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite before 3.35 cannot ALTER TABLE ... DROP COLUMN (downgrade), and the
    # same form on both sides keeps them symmetric; on PostgreSQL it is a plain ALTER TABLE.
    with op.batch_alter_table("gemmtune_tuned_configs") as batch:
        batch.add_column(sa.Column("bands", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gemmtune_tuned_configs") as batch:
        batch.drop_column("bands")
