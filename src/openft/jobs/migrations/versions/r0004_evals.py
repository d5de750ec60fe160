"""The Evals API (issue 19): evals, their runs, and each run's output items.

- evals: an eval's data source config (the item schema) and testing criteria.
- eval_runs: one run of an eval over a data source (items, and a model to sample
  with a prompt template), claimed by a worker like a job (worker_id + attempts
  fence its writes), with its result counts once done.
- eval_output_items: one graded item of a run; (run_id, datasource_item_id) is
  unique, so a run resumed after a crash adds no item twice.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIG = sa.Integer().with_variant(sa.BigInteger(), "postgresql")
SECONDS = sa.REAL().with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "evals",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("data_source_config", sa.Text, nullable=False),  # JSON
        sa.Column("testing_criteria", sa.Text, nullable=False),  # JSON
        sa.Column("metadata", sa.Text),  # JSON
        sa.Column("created_at", BIG, nullable=False),
    )
    op.create_index("evals_owner", "evals", ["owner", "created_at"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("eval_id", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),  # queued | in_progress | completed | failed | canceled
        sa.Column("model", sa.Text),
        sa.Column("data_source", sa.Text, nullable=False),  # JSON, as sent
        sa.Column("metadata", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("result_counts", sa.Text),
        sa.Column("per_testing_criteria_results", sa.Text),
        sa.Column("per_model_usage", sa.Text),
        sa.Column("created_at", BIG, nullable=False),
        sa.Column("started_at", BIG),
        sa.Column("finished_at", BIG),
        sa.Column("worker_id", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("heartbeat_at", SECONDS),
    )
    op.create_index("eval_runs_eval", "eval_runs", ["eval_id", "created_at"])
    op.create_index("eval_runs_status", "eval_runs", ["status", "created_at"])
    op.create_table(
        "eval_output_items",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("eval_id", sa.Text, nullable=False),
        sa.Column("datasource_item_id", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),  # pass | fail | error
        sa.Column("datasource_item", sa.Text, nullable=False),
        sa.Column("sample", sa.Text),
        sa.Column("results", sa.Text, nullable=False),
        sa.Column("created_at", BIG, nullable=False),
        sa.UniqueConstraint("run_id", "datasource_item_id", name="eval_output_items_once"),
    )


def downgrade() -> None:
    raise NotImplementedError("the job store is never downgraded")
