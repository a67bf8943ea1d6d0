"""The SQL helper against a real PostgreSQL (CI machines run one; `.ci/run` starts it if down)."""

import uuid

from sqlalchemy import text

from services.common.db import make_engine
from tests.processes import PG_URL


def test_postgres_round_trip_through_the_same_helper() -> None:
    engine = make_engine(PG_URL)
    table = f"t_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TEMP TABLE {table} (k text primary key, v int)"))
        conn.execute(text(f"INSERT INTO {table} VALUES ('a', 1), ('b', 2)"))
        assert conn.execute(text(f"SELECT sum(v) FROM {table}")).scalar() == 3
    engine.dispose()
