"""Alembic migration scripts for the sonoseg database (run with ``sonoseg db upgrade``)."""
