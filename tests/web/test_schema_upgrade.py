"""A database made before the dashboard gets the columns it added, on the next start."""

from __future__ import annotations

import sqlalchemy as sa
from gpunexus.hub.db import _ADDED_COLUMNS


def test_missing_columns_are_added_to_an_older_database(db):
    with db.engine.begin() as conn:
        for column in _ADDED_COLUMNS:  # an older database has no index on them either
            for index in column.table.indexes:
                if column in index.columns.values():
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
        for column in _ADDED_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE {column.table.name} DROP COLUMN {column.name}")
    db.create_schema()
    db.create_schema()  # and again: nothing to do
    with db.engine.connect() as conn:
        inspector = sa.inspect(conn)
        for column in _ADDED_COLUMNS:
            assert column.name in {c["name"] for c in inspector.get_columns(column.table.name)}
        assert "receipt_log_by_key" in {i["name"] for i in inspector.get_indexes("receipt_log")}
