"""Initial schema: devices, kernel builds, problems, workloads, tuning runs, tuned configs.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from gemmtune.db.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gemmtune_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("vendor", sa.String(32), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("compute_capability", sa.String(16), nullable=False),
        sa.Column("sm_count", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("driver_version", sa.String(64), nullable=False),
        sa.Column("runtime_version", sa.String(64), nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_devices"),
        sa.UniqueConstraint("fingerprint", name="uq_gemmtune_devices_fingerprint"),
    )
    op.create_table(
        "gemmtune_kernel_builds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kernel_hash", sa.String(128), nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_kernel_builds"),
        sa.UniqueConstraint("kernel_hash", name="uq_gemmtune_kernel_builds_kernel_hash"),
    )
    op.create_table(
        "gemmtune_problems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("k", sa.Integer(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("bits", sa.Integer(), nullable=True),
        sa.Column("group_size", sa.Integer(), nullable=True),
        sa.Column("act_order", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_problems"),
        sa.UniqueConstraint("key", name="uq_gemmtune_problems_key"),
    )
    op.create_table(
        "gemmtune_workloads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("ms", sa.JSON(), nullable=True),
        sa.Column("weights", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_workloads"),
        sa.UniqueConstraint("key", name="uq_gemmtune_workloads_key"),
    )
    op.create_table(
        "gemmtune_tuning_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("kernel_build_id", sa.Integer(), nullable=False),
        sa.Column("problem_id", sa.Integer(), nullable=False),
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("sampler", sa.String(64), nullable=False),
        sa.Column("trials", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("tool_version", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["gemmtune_devices.id"], name="fk_gemmtune_tuning_runs_device_id"),
        sa.ForeignKeyConstraint(["kernel_build_id"], ["gemmtune_kernel_builds.id"], name="fk_gemmtune_tuning_runs_kernel_build_id"),
        sa.ForeignKeyConstraint(["problem_id"], ["gemmtune_problems.id"], name="fk_gemmtune_tuning_runs_problem_id"),
        sa.ForeignKeyConstraint(["workload_id"], ["gemmtune_workloads.id"], name="fk_gemmtune_tuning_runs_workload_id"),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_tuning_runs"),
    )
    op.create_table(
        "gemmtune_tuned_configs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("kernel_build_id", sa.Integer(), nullable=False),
        sa.Column("problem_id", sa.Integer(), nullable=False),
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_key", sa.String(256), nullable=False),
        sa.Column("objective_us", sa.Float(), nullable=False),
        sa.Column("default_objective_us", sa.Float(), nullable=False),
        sa.Column("latencies_us", sa.JSON(), nullable=False),
        sa.Column("default_latencies_us", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("provenance", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["gemmtune_devices.id"], name="fk_gemmtune_tuned_configs_device_id"),
        sa.ForeignKeyConstraint(["kernel_build_id"], ["gemmtune_kernel_builds.id"], name="fk_gemmtune_tuned_configs_kernel_build_id"),
        sa.ForeignKeyConstraint(["problem_id"], ["gemmtune_problems.id"], name="fk_gemmtune_tuned_configs_problem_id"),
        sa.ForeignKeyConstraint(["workload_id"], ["gemmtune_workloads.id"], name="fk_gemmtune_tuned_configs_workload_id"),
        sa.ForeignKeyConstraint(["run_id"], ["gemmtune_tuning_runs.id"], ondelete="SET NULL", name="fk_gemmtune_tuned_configs_run_id"),
        sa.PrimaryKeyConstraint("id", name="pk_gemmtune_tuned_configs"),
        sa.UniqueConstraint("device_id", "kernel_build_id", "problem_id", "workload_id",
                            name="uq_gemmtune_tuned_configs_device_id"),
    )
    op.create_index("ix_gemmtune_tuned_configs_device_id", "gemmtune_tuned_configs", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_gemmtune_tuned_configs_device_id", table_name="gemmtune_tuned_configs")
    for table in ("gemmtune_tuned_configs", "gemmtune_tuning_runs", "gemmtune_workloads",
                  "gemmtune_problems", "gemmtune_kernel_builds", "gemmtune_devices"):
        op.drop_table(table)
