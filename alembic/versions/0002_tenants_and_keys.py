"""tenants, API keys, tenant scoping and metadata

Existing rows (an embedded install upgraded in place) are given to a tenant named "default".

Revision ID: 0002
Revises: 0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
SCOPED = ("models", "datasets", "jobs")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("name", sa.String(length=100), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("tenant_id", sa.String(length=40), sa.ForeignKey("tenants.id"), nullable=False, index=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    existing = any(
        op.get_bind().execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() for table in SCOPED
    )
    if existing:
        op.get_bind().execute(sa.text(
            "INSERT INTO tenants (id, name, created_at) VALUES ('ten_default', 'default', CURRENT_TIMESTAMP)"))
    for table in SCOPED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(length=40), nullable=True))
            batch.add_column(sa.Column("metadata", JSONType, nullable=True))
        op.get_bind().execute(sa.text(f"UPDATE {table} SET tenant_id = 'ten_default', metadata = '{{}}'"))
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", nullable=False)
            batch.alter_column("metadata", nullable=False)
            batch.create_foreign_key(f"fk_{table}_tenant", "tenants", ["tenant_id"], ["id"])
            batch.create_index(f"ix_{table}_tenant_id", ["tenant_id"])


def downgrade() -> None:
    for table in SCOPED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant_id")
            batch.drop_constraint(f"fk_{table}_tenant", type_="foreignkey")
            batch.drop_column("metadata")
            batch.drop_column("tenant_id")
    op.drop_table("api_keys")
    op.drop_table("tenants")
