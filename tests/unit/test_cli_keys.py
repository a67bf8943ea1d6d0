"""`crucible keys`: an operator changes a key in place, with the API's own checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services import cli
from services.gateway.keys import KeyStore


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyStore:
    monkeypatch.setenv("CRUCIBLE_VAR_DIR", str(tmp_path))
    return KeyStore(f"sqlite:///{tmp_path / 'gateway.db'}")


def test_update_changes_what_it_names_and_keeps_the_rest(
    store: KeyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _, info = store.create("alice", name="laptop", rpm=60, models=["a"], expires_at=4102444800)
    argv = ["keys", "update", info["id"], "--rpm", "default", "--models", "a,b"]
    assert cli.main([*argv, "--store", "--expires", "never"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["rpm"], shown["models"], shown["store"], shown["expires_at"]) == (
        None,
        ["a", "b"],
        True,
        None,
    )
    assert (shown["name"], shown["owner"]) == ("laptop", "alice")
    assert cli.main(["keys", "update", info["id"], "--expires", "2100-01-01"]) == 0
    assert store.get(info["id"])["expires_at"] == 4102444800  # type: ignore[index]


def test_update_refuses_what_the_api_refuses(
    store: KeyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _, info = store.create("alice", rpm=60)
    assert cli.main(["keys", "update", info["id"], "--rpm", "-5"]) == 2
    assert cli.main(["keys", "update", info["id"], "--expires", "2001-01-01"]) == 2
    assert cli.main(["keys", "update", info["id"]]) == 2  # nothing to change
    assert cli.main(["keys", "update", "key_nope", "--rpm", "5"]) == 1
    assert store.get(info["id"])["rpm"] == 60  # type: ignore[index]
    capsys.readouterr()
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert info["id"] in listed and "expires=-" in listed and "last-used=-" in listed


def test_the_audit_command_shows_key_changes_newest_first(
    store: KeyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _, info = store.create("alice", rpm=60)
    assert cli.main(["keys", "update", info["id"], "--rpm", "30"]) == 0
    assert cli.main(["keys", "revoke", info["id"]]) == 0
    capsys.readouterr()
    assert cli.main(["audit", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["key.revoke", "key.update"]
    assert all(info["id"] in line and "by cli" in line for line in lines)
    assert '{"rpm": 30}' in lines[1]


def test_a_lab_sets_up_a_project_with_keys_of_each_kind(
    store: KeyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["projects", "create", "Synthesis group"]) == 0
    project = json.loads(capsys.readouterr().out)
    pid = project["id"]
    assert pid.startswith("proj_") and project["status"] == "active"
    made = []
    for extra in (["--role", "reviewer"], ["--service-account", "--role", "reader"], []):
        assert cli.main(["keys", "create", "--project", pid, *extra]) == 0
        made.append(json.loads(capsys.readouterr().out))
    assert [(k["role"], k["service_account"]) for k in made] == [
        ("reviewer", False),
        ("reader", True),
        ("member", False),
    ]
    assert all(k["project_id"] == pid and k["key"].startswith("sk-cru-") for k in made)
    # A service account is a member or a reader; an unknown project is refused, not made.
    assert cli.main(["keys", "create", "--project", pid, "--service-account", "--role", "admin"])
    assert cli.main(["keys", "create", "--project", "proj_nowhere"]) == 1
    assert cli.main(["keys", "update", made[1]["id"], "--role", "reviewer"]) == 2
    assert cli.main(["keys", "update", made[0]["id"], "--role", "member"]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "list", "--project", pid]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and all(f"project={pid}" in line for line in listed)
    assert sum("service-account" in line for line in listed) == 1
    assert sum("  member  " in line for line in listed) == 2  # the reviewer became a member

    assert cli.main(["projects", "archive", pid]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "archived"
    assert all(store.lookup(k["key"]) is None for k in made)  # its keys went with it
    assert cli.main(["keys", "create", "--project", pid]) == 1
    assert cli.main(["projects", "list"]) == 0
    assert pid not in capsys.readouterr().out
    assert cli.main(["projects", "list", "--all"]) == 0
    assert f"{pid}  archived" in capsys.readouterr().out


def test_each_role_holds_what_the_readme_says() -> None:
    from services.gateway import roles

    assert roles.allowed(roles.needed("GET", "/v1/files")) == ["admin", "member", "reader"]
    assert roles.allowed(roles.needed("GET", "/v1/evals/e/runs")) == list(roles.ROLES)
    assert roles.allowed(roles.needed("POST", "/v1/chat/completions/c/feedback")) == [
        "admin",
        "member",
        "reviewer",
    ]
    assert roles.needed("POST", "/v1/vector_stores/vs/search") == roles.READ
    assert roles.allowed(roles.needed("POST", "/v1/chat/completions")) == ["admin", "member"]
    assert roles.allowed(roles.needed("GET", "/admin/keys")) == ["admin"]
    # A path that merely looks like a reviewed one is not.
    assert roles.needed("GET", "/v1/chat/completions_export") == roles.READ
    assert roles.needed("GET", "/v1/evalsx") == roles.READ


def test_budgets_are_set_from_the_cli_and_a_months_usage_is_reported(
    store: KeyStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import orjson

    from services.finetune.config import FinetuneSettings
    from services.finetune.jobs import JobStore
    from services.finetune.usage import UsageStore

    assert cli.main(["projects", "create", "Kinetics", "--budget-tokens", "5000"]) == 0
    project = json.loads(capsys.readouterr().out)
    assert (project["budget_tokens"], project["budget_period"]) == (5000, "month")
    assert cli.main(["projects", "update", project["id"], "--budget-tokens", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_tokens"] is None
    argv = ["keys", "create", "--project", project["id"], "--budget-tokens", "900"]
    assert cli.main([*argv, "--budget-period", "day"]) == 0
    key = json.loads(capsys.readouterr().out)
    assert (key["budget_tokens"], key["budget_period"]) == (900, "day")
    assert cli.main(["keys", "update", key["id"], "--budget-tokens", "0"]) == 2  # at least 1
    assert cli.main(["keys", "update", key["id"], "--budget-tokens", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_tokens"] is None

    jobs = JobStore(FinetuneSettings().db_url())  # the finetune database `crucible` reads
    t0 = 1_767_225_600  # 2026-01-01 00:00 UTC
    records = [
        (t0 + 10, "lab", "m1", "completions", 100, 20, 1.5),
        (t0 + 20, "lab", "m1", "completions", 50, 5, 0.5),
        (t0 + 30, "lab", "emb", "embeddings", 7, 0, 0.25),
        (t0 - 1, "lab", "m1", "completions", 999, 999, 9.0),  # December: not January's
    ]
    UsageStore(jobs.session).ingest(
        [
            {
                b"meta": orjson.dumps(
                    {
                        "id": f"u{i}",
                        "at": at,
                        "kind": kind,
                        "project_id": project_id,
                        "api_key_id": "key_a",
                        "model": model,
                        "input_tokens": tin,
                        "output_tokens": tout,
                        "engine_s": seconds,
                    }
                )
            }
            for i, (at, project_id, model, kind, tin, tout, seconds) in enumerate(records)
        ]
    )
    jobs.engine.dispose()
    capsys.readouterr()
    # Priced at $1 an engine-second (a month's hosting at 2,629,800 s), and a hosted API's list.
    monkeypatch.setenv("CRUCIBLE_FINETUNE_COST_HOSTING_USD_MONTH", "2629800")
    monkeypatch.setenv("CRUCIBLE_FINETUNE_COST_HOSTED_PRICES", '{"*": {"input": 1e4}}')
    assert cli.main(["usage", "--month", "2026-01", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "project_id,model,kind,requests,input_tokens,output_tokens,input_cached_tokens,"
        "engine_seconds,cost_usd,hosted_usd",
        "lab,m1,completions,2,150,25,0,2.0,2.0,1.5",  # 150 tokens at $10,000 a million
        "lab,emb,embeddings,1,7,0,0,0.25,0.25,0.07",
    ]
    assert cli.main(["usage", "--month", "2026-01"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["lab", "m1", "completions", "2", "150", "25", "2.0", "2.00", "1.50"] in table
    assert table[-1] == ["total", "2026-01", "157", "25", "2.2", "2.25", "1.57"]


def test_dollar_budgets_need_the_gateways_price_list(
    store: KeyStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRUCIBLE_GATEWAY_BUDGET_PRICES", raising=False)
    assert cli.main(["projects", "create", "Spectra", "--budget-usd", "250"]) == 2
    assert "CRUCIBLE_GATEWAY_BUDGET_PRICES" in capsys.readouterr().err
    monkeypatch.setenv("CRUCIBLE_GATEWAY_BUDGET_PRICES", '{"*": {"input": 0.5, "output": 1.5}}')
    assert cli.main(["projects", "create", "Spectra", "--budget-usd", "250"]) == 0
    project = json.loads(capsys.readouterr().out)
    assert (project["budget_usd"], project["budget_tokens"]) == (250.0, None)
    argv = ["keys", "create", "--project", project["id"], "--budget-usd", "12.345678"]
    assert cli.main([*argv, "--budget-tokens", "1000"]) == 0
    key = json.loads(capsys.readouterr().out)
    assert (key["budget_usd"], key["budget_tokens"]) == (12.345678, 1000)
    for bad in ("0", "nan", "-1"):
        assert cli.main(["keys", "update", key["id"], "--budget-usd", bad]) == 2
    assert cli.main(["keys", "update", key["id"], "--budget-usd", "none"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["budget_usd"], shown["budget_tokens"]) == (None, 1000)
    assert cli.main(["projects", "update", project["id"], "--budget-usd", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_usd"] is None
