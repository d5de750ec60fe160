"""jobs.stalls: attempts in a row that ended without a new checkpoint.

A worker that dies while making progress should not use up its job's retries.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Databases from before schema versions gained this column without a version.
    if "stalls" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("jobs")}:
        op.add_column("jobs", sa.Column("stalls", sa.Integer, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    raise NotImplementedError("the job store is never downgraded")
