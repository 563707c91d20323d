"""key scopes; idempotency records per API key

``api_keys.is_admin`` becomes ``scope`` (member | admin | operator). Existing admin keys become
tenant admins: none is made an operator, since before this change any admin key could act on
every tenant and nothing tells which of them the operator meant to keep that power.

Idempotency records are now scoped to the API key that made them. Rows stored before have no
key to attribute them to; they are at most a day old replays, so they are dropped rather than
guessed (a retry of such a request runs again, as it would after the records expire).

Revision ID: 0010
Revises: 0009

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=20), nullable=True))
    op.execute(sa.text("UPDATE api_keys SET scope = CASE WHEN is_admin THEN 'admin' ELSE 'member' END"))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.alter_column('scope', existing_type=sa.String(length=20), nullable=False)
        batch_op.drop_column('is_admin')

    op.execute(sa.text("DELETE FROM idempotency_keys"))
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_constraint('uq_idempotency_tenant_key', type_='unique')
        batch_op.add_column(sa.Column('api_key_id', sa.String(length=40), nullable=False))
        batch_op.add_column(sa.Column('scope', sa.String(length=20), nullable=True))
        batch_op.create_unique_constraint('uq_idempotency_api_key_key', ['api_key_id', 'key'])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM idempotency_keys"))
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_constraint('uq_idempotency_api_key_key', type_='unique')
        batch_op.drop_column('scope')
        batch_op.drop_column('api_key_id')
        batch_op.create_unique_constraint('uq_idempotency_tenant_key', ['tenant_id', 'key'])

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('is_admin', sa.Boolean(), nullable=True))
    op.execute(sa.text("UPDATE api_keys SET is_admin = (scope <> 'member')"))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.alter_column('is_admin', existing_type=sa.Boolean(), nullable=False)
        batch_op.drop_column('scope')
