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
