"""The database: models (SQLAlchemy 2), engines and units of work, migrations (Alembic).

Owns the schema and its rules (unique and partial indexes, not application locks). Imports only
``backend.storage`` (private file modes) and ``backend.errors``.
"""
