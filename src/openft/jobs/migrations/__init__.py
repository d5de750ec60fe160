"""Alembic migrations of the job store, applied by openft.jobs.schema (no alembic.ini, no env.py)."""
