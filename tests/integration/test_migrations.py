"""Schema migrations: an older database upgrades with its data intact, on SQLite and PostgreSQL.

`tests/data/pre-migrations/` holds the four databases as the release before migrations left
them (its agent database predates the `tool_choice` column, added then without a migration).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text

from services import cli
from services.agent.runs import RunRow, RunStore
from services.common import migrations
from services.common.db import make_engine, make_sessionmaker
from services.common.pagination import PageQuery
from services.finetune.captures import CaptureStore
from services.finetune.jobs import JobStore
from services.gateway.keys import KeyStore
from services.gateway.projects import Projects
from services.retrieval.catalog import Catalog
from tests.processes import postgres_database

DUMPS = Path(__file__).resolve().parents[1] / "data" / "pre-migrations"
SCHEMAS = list(migrations.SCHEMAS)

# What the dumps hold (the secrets were fixed when they were made).
ALICE_SECRET = "sk-cru-alice-laptop-" + "a" * 30
ADMIN_SECRET = "sk-cru-ops-admin-" + "b" * 33
REVOKED_SECRET = "sk-cru-bob-old-" + "c" * 35
FILE_ID = "file-" + "1" * 24
STORE_ID = "vs_04a8211d4437d91568a1bee4"
JOB_ID = "ftjob-" + "2" * 24
RUN_ID = "run_" + "3" * 24


def _restore(dump: str, path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript((DUMPS / f"{dump}.sql").read_text())
    con.close()


@pytest.fixture
def old_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A var dir holding the previous release's four databases, as `crucible db` sees it."""
    for schema in SCHEMAS:
        _restore(schema, tmp_path / f"{schema}.db")
    monkeypatch.setenv("CRUCIBLE_VAR_DIR", str(tmp_path))
    return tmp_path


def test_crucible_db_upgrade_keeps_every_record_of_the_previous_release(
    old_var: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["db", "upgrade"]) == 0
    printed = capsys.readouterr().out
    for schema in SCHEMAS:
        assert f"{schema}: {migrations.head(schema)}\n" in printed

    keys = KeyStore(f"sqlite:///{old_var / 'gateway.db'}")
    alice = keys.lookup(ALICE_SECRET)
    assert alice is not None and alice.owner == "alice" and alice.rpm == 60
    assert alice.models == frozenset({"crucible-dev"})
    admin = keys.lookup(ADMIN_SECRET)
    assert admin is not None and admin.is_admin
    assert keys.lookup(REVOKED_SECRET) is None
    assert len(keys.list()) == 3
    # Each owner became a project of the same id (the services' data stays where it is), and
    # the admin flag a role.
    assert [(p["id"], p["status"]) for p in Projects(keys).list()] == [
        ("alice", "active"),
        ("ops", "active"),
        ("bob", "active"),
    ]
    assert (alice.role, admin.role) == ("member", "admin")

    catalog = Catalog(f"sqlite:///{old_var / 'retrieval.db'}")
    assert catalog.file("alice", FILE_ID).filename == "reactions.txt"
    assert catalog.store("alice", STORE_ID).meta == {"team": "synthesis"}
    member = catalog.store_file("alice", STORE_ID, FILE_ID)
    assert (member.status, member.chunk_count, member.attributes) == (
        "completed",
        3,
        {"year": 2026},
    )

    jobs = JobStore(f"sqlite:///{old_var / 'finetune.db'}")
    job = jobs.get(JOB_ID, "alice")
    assert job.status == "succeeded" and job.fine_tuned_model == f"ft:crucible-dev:chem:{JOB_ID}"
    events = jobs.events(JOB_ID, "alice", limit=20, after=None)["data"]
    assert any(e["type"] == "metrics" and e["data"]["train_loss"] == 1.23 for e in events)
    assert (
        jobs.checkpoints(
            JOB_ID, "alice", PageQuery(limit=10, order="desc", after=None, before=None)
        )["data"][0]["step_number"]
        == 10
    )
    assert [a.model for a in jobs.adapters()] == [job.fine_tuned_model]

    runs = RunStore(f"sqlite:///{old_var / 'agent.db'}")
    run = runs.get(RUN_ID, "alice")
    # The column the old database lacked: added, and the old run reads as it behaved ("auto").
    assert (run.status, run.tool_choice, run.output) == (
        "completed",
        "auto",
        {"text": "46.07 g/mol"},
    )
    assert runs.steps(RUN_ID)[0]["output"] == {"mw": 46.07}
    newer = RunRow(**{c: getattr(run, c) for c in ("owner", "key_id", "model", "mode")})
    newer.id, newer.tool_choice, newer.status, newer.created_at = "run_new", "required", "queued", 1
    for field in ("instructions", "nonce", "messages", "tools", "vector_store_ids", "budgets"):
        setattr(newer, field, getattr(run, field))
    newer.usage = {}
    runs.create(newer)
    assert runs.get("run_new", "alice").tool_choice == "required"
    for store in (keys, catalog, jobs, runs):
        store.engine.dispose()


def test_a_second_upgrade_changes_nothing(old_var: Path) -> None:
    assert cli.main(["db", "upgrade"]) == 0
    before = {s: (old_var / f"{s}.db").read_bytes() for s in SCHEMAS}
    assert cli.main(["db", "upgrade"]) == 0
    assert {s: (old_var / f"{s}.db").read_bytes() for s in SCHEMAS} == before


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A database no release has touched: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        yield engine
        engine.dispose()
        return
    with postgres_database() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_head_revision_is_exactly_what_the_models_declare(
    empty_db: Engine, schema: str
) -> None:
    """A model changed without a migration fails here, on both databases."""
    migrations.upgrade(empty_db, schema)
    assert migrations.current(empty_db, schema) == migrations.head(schema)
    with empty_db.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, type_, _p: (
                    type_ != "table" or name in migrations.metadata(schema).tables
                ),
            },
        )
        diff = compare_metadata(ctx, migrations.metadata(schema))
    assert diff == []


def test_a_database_the_previous_release_made_with_create_all_is_adopted(empty_db: Engine) -> None:
    """What 52bf93e's services did at start, on either database; its agent table already had
    tool_choice, so the revision that adds it must find it there and change nothing."""
    for schema in SCHEMAS:  # the first revision is that release's schema, without a version
        migrations.upgrade(empty_db, schema, f"{schema}_0001")
        with empty_db.begin() as conn:
            conn.execute(text(f"DROP TABLE {migrations.version_table(schema)}"))
    with empty_db.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE agent_runs ADD COLUMN tool_choice VARCHAR(16) DEFAULT 'auto' NOT NULL"
            )
        )
        conn.execute(
            text(
                "INSERT INTO api_keys (id, key_hash, hint, owner, name, is_admin, created_at)"
                " VALUES ('key_old', :h, 'abcd', 'alice', 'laptop', false, CURRENT_TIMESTAMP)"
            ),
            {"h": "0" * 64},
        )
    for schema in SCHEMAS:
        migrations.upgrade(empty_db, schema)
        assert migrations.current(empty_db, schema) == migrations.head(schema)
    keys = KeyStore(empty_db)
    assert [(k["id"], k["role"], k["project_id"]) for k in keys.list("alice")] == [
        ("key_old", "member", "alice")
    ]


def test_all_four_schemas_share_one_postgres_database_and_downgrade_cleanly(
    empty_db: Engine,
) -> None:
    """Compose keeps every service in one database: each schema has its own version table."""
    for schema in SCHEMAS:
        migrations.upgrade(empty_db, schema)
    assert {s: migrations.current(empty_db, s) for s in SCHEMAS} == {
        s: migrations.head(s) for s in SCHEMAS
    }
    migrations.downgrade(empty_db, "agent", "agent_0001")
    with empty_db.connect() as conn:
        columns = set(conn.execute(text("SELECT * FROM agent_runs LIMIT 0")).keys())
    assert "tool_choice" not in columns and "instructions" in columns
    assert migrations.current(empty_db, "gateway") == migrations.head("gateway")
    migrations.upgrade(empty_db, "agent")
    assert migrations.current(empty_db, "agent") == migrations.head("agent")


def test_processes_starting_together_migrate_once(empty_db: Engine) -> None:
    """The fine-tuning service and its worker open one database at the same moment."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        engine = make_engine(empty_db.url.render_as_string(hide_password=False))
        try:
            barrier.wait()
            migrations.upgrade(engine, "finetune")
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert migrations.current(empty_db, "finetune") == migrations.head("finetune")


def test_completions_stored_before_sizes_existed_are_charged_their_size(empty_db: Engine) -> None:
    """finetune_0006 backfills what the stored-data quota counts, on SQLite and PostgreSQL."""
    migrations.upgrade(empty_db, "finetune", "finetune_0005")
    request = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    response = json.dumps({"id": "chatcmpl-1", "choices": []})
    with empty_db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO stored_completions (id, owner, key_id, model, created_at, request,"
                " response, prompt_hash) VALUES ('chatcmpl-1', 'alice', 'key_1', 'm', 1.0,"
                " :request, :response, 'h')"
            ),
            {"request": request, "response": response},
        )
    migrations.upgrade(empty_db, "finetune")
    charged = CaptureStore(make_sessionmaker(empty_db)).owners_over(1)
    assert charged == {"alice": len(request) + len(response)}
