"""webhook secrets encrypted at rest

Jobs stored before this kept ``webhook_secret`` as the client's ``whsec_...`` text; from now on
the column holds the key bytes encrypted (``app.webhooks.seal_secret``, key from
``SQUEEZE_SECRET_KEY`` or the embedded default's key file). Downgrade writes the text back.

Revision ID: 0009
Revises: 0008

"""
import base64
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from app import crypto
from app.webhooks import SECRET_CONTEXT, seal_secret


# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('webhook_secret', sa.String))


def _rewrite(convert, pick) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.webhook_secret).where(jobs.c.webhook_secret.is_not(None))).all()
    for job_id, secret in rows:
        if pick(secret):
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(webhook_secret=convert(secret)))


def upgrade() -> None:
    _rewrite(seal_secret, lambda secret: secret.startswith('whsec_'))


def downgrade() -> None:
    def unseal(token: str) -> str:
        return 'whsec_' + base64.b64encode(crypto.decrypt(token, context=SECRET_CONTEXT)).decode()

    _rewrite(unseal, lambda secret: not secret.startswith('whsec_'))
