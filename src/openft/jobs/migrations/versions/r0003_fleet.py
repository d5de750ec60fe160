"""The fleet: many workers and API replicas over one store.

- jobs.worker_id: the worker that holds the job's lease (a pid is not unique
  across machines); with jobs.attempts it is the fencing token.
- jobs.ranks / jobs.gpus: what the job needs, so a worker claims only jobs it can run.
- fleet: one row per worker or API replica, with its heartbeat, for `openft status`.
- settings: the store's identity, which its files' folder (OPENFT_HOME) carries too.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BIG = sa.Integer().with_variant(sa.BigInteger(), "postgresql")
SECONDS = sa.REAL().with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("worker_id", sa.Text))
    op.add_column("jobs", sa.Column("ranks", sa.Integer, nullable=False, server_default=sa.text("1")))
    op.add_column("jobs", sa.Column("gpus", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.create_table(
        "fleet",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),  # worker | replica
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("machine", sa.Text, nullable=False),  # hostname + boot id: where its pid means something
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("address", sa.Text),  # a replica's listen address
        sa.Column("capabilities", sa.Text),  # JSON: cpus, gpus, max_ranks
        sa.Column("job_id", sa.Text),  # what a worker runs now
        sa.Column("started_at", BIG, nullable=False),
        sa.Column("heartbeat_at", SECONDS, nullable=False),
        sa.Column("stopped_at", BIG),
    )
    op.create_index("fleet_kind", "fleet", ["kind", "heartbeat_at"])
    op.create_table("settings", sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))


def downgrade() -> None:
    raise NotImplementedError("the job store is never downgraded")
