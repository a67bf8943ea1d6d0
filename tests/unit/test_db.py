from pathlib import Path

from sqlalchemy import text

from services.common.db import make_engine


def test_sqlite_url_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'x.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert (tmp_path / "nested" / "x.db").exists()


def test_postgresql_url_uses_the_psycopg3_driver() -> None:
    engine = make_engine("postgresql://u:p@127.0.0.1:1/db")
    assert engine.url.drivername == "postgresql+psycopg"
