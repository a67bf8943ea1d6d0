"""Projects and roles through the gateway with the official `openai` client: every route of the
public API walked with each of the four roles (allowed, or a 403 naming the permission), objects
shared inside a project and 404 outside it, a reviewer correcting another member's completion,
an admin acting in another project with the SDK's `project=`, service accounts, archiving, and
the audit log recording each of these actions."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DENSE

ROLES = ("admin", "member", "reviewer", "reader")
# The documented policy (README, "Projects, roles and keys"), written out independently of
# services/gateway/roles.py.
REVIEWED = re.compile(r"^/v1/(chat/completions|evals)(/|$)")


def allowed(method: str, path: str) -> set[str]:
    if path.startswith("/admin/"):
        return {"admin"}
    if method == "GET":
        if REVIEWED.match(path):
            return {"admin", "member", "reviewer", "reader"}
        return {"admin", "member", "reader"}
    if method == "POST" and path.startswith("/v1/chat/completions/") and path.endswith("/feedback"):
        return {"admin", "member", "reviewer"}
    if method == "POST" and path.startswith("/v1/vector_stores/") and path.endswith("/search"):
        return {"admin", "member", "reader"}
    return {"admin", "member"}


def _admin_call(gateway_url: str, admin_key: str, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(
        method,
        f"{gateway_url}{path}",
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=30,
        **kw,
    )
    assert r.status_code < 300, (path, r.status_code, r.text)
    return r.json()


@pytest.fixture(scope="module")
def admin(gateway_url: str, admin_key: str) -> Any:
    """The admin API (outside /v1) as the stack's admin key."""
    return lambda method, path, **kw: _admin_call(gateway_url, admin_key, method, path, **kw)


@pytest.fixture(scope="module")
def lab(admin: Any) -> dict[str, Any]:
    """Two projects: `a` with a key of each role and a second member, `b` with a member and a
    reviewer."""
    tag = uuid.uuid4().hex[:8]
    a = admin("POST", "/admin/projects", json={"name": f"synthesis {tag}"})
    b = admin("POST", "/admin/projects", json={"name": f"spectroscopy {tag}"})
    out: dict[str, Any] = {"a": a, "b": b, "keys": {}}

    def key(project: str, role: str, **extra: Any) -> dict[str, Any]:
        body = {"project_id": project, "role": role, "rpm": 0, "name": role, **extra}
        return admin("POST", "/admin/keys", json=body)

    for role in ROLES:
        out["keys"][f"a-{role}"] = key(a["id"], role)
    out["keys"]["a-member2"] = key(a["id"], "member")
    out["keys"]["b-member"] = key(b["id"], "member")
    out["keys"]["b-reviewer"] = key(b["id"], "reviewer")
    return out


@pytest.fixture(scope="module")
def sdk(gateway_url: str, lab: dict[str, Any]) -> Iterator[Any]:
    made: list[openai.OpenAI] = []

    def client(name: str, **kw: Any) -> openai.OpenAI:
        c = openai.OpenAI(
            base_url=f"{gateway_url}/v1", api_key=lab["keys"][name]["key"], max_retries=0, **kw
        )
        made.append(c)
        return c

    yield client
    for c in made:
        c.close()


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "missing0000", path)


def test_every_route_answers_each_role_as_documented(gateway_url: str, lab: dict[str, Any]) -> None:
    document = httpx.get(f"{gateway_url}/openapi.json", timeout=30).json()
    operations = [
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "delete")
    ]
    assert len(operations) >= 70  # every service's routes are in the document
    assert ("POST", "/v1/chat/completions/{completion_id}/feedback") in operations
    assert ("POST", "/admin/projects") in operations
    wrong: list[str] = []
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        for method, path in operations:
            documented = document["paths"][path][method.lower()]["x-crucible-roles"]
            if set(documented) != allowed(method, path):
                wrong.append(f"{method} {path}: documented for {documented}")
            for role in ROLES:
                secret = lab["keys"][f"a-{role}"]["key"]
                r = http.request(
                    method,
                    _fill(path),
                    headers={"authorization": f"Bearer {secret}"},
                    json={} if method == "POST" else None,
                )
                if role in allowed(method, path):
                    if r.status_code in (401, 403):
                        wrong.append(f"{role} {method} {path}: {r.status_code} {r.text[:200]}")
                elif r.status_code != 403 or (
                    r.json()["error"]["code"] != "insufficient_permissions"
                ):
                    wrong.append(f"{role} {method} {path}: {r.status_code}, expected 403")
    assert not wrong, "\n".join(wrong)


def test_a_project_shares_its_objects_and_hides_them_from_others(sdk: Any) -> None:
    member, member2, reader = sdk("a-member"), sdk("a-member2"), sdk("a-reader")
    outsider = sdk("b-member")
    made = member.files.create(file=("notes.txt", b"Benzene is aromatic.\n"), purpose="assistants")
    assert member2.files.retrieve(made.id).filename == "notes.txt"  # a colleague's file
    assert made.id in {f.id for f in reader.files.list()}
    with pytest.raises(openai.NotFoundError):
        outsider.files.retrieve(made.id)
    assert made.id not in {f.id for f in outsider.files.list()}
    with pytest.raises(openai.PermissionDeniedError) as denied:
        reader.files.delete(made.id)  # a reader reads
    assert denied.value.code == "insufficient_permissions"
    assert member2.files.delete(made.id).deleted


def test_a_reviewer_corrects_another_members_completion(sdk: Any, lab: dict[str, Any]) -> None:
    member, reviewer, reader = sdk("a-member"), sdk("a-reviewer"), sdk("a-reader")
    reply = member.chat.completions.create(
        model=DENSE,
        messages=[{"role": "user", "content": "Name a noble gas."}],
        max_tokens=8,
        store=True,
    )
    deadline = time.monotonic() + 15
    while True:  # the outbox delivers it to the store
        try:
            seen = reviewer.chat.completions.retrieve(reply.id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "the completion was never stored"
            time.sleep(0.1)
    assert seen.choices[0].message.content == reply.choices[0].message.content
    fixed = {"role": "assistant", "content": "Argon."}
    given = reviewer.post(
        f"/chat/completions/{reply.id}/feedback",
        body={"metric": "rating", "value": "bad", "correction": fixed},
        cast_to=object,
    )
    assert given["correction"] == fixed
    assert given["key_id"] == lab["keys"]["a-reviewer"]["id"]  # who corrected it
    got = member.chat.completions.retrieve(reply.id)
    assert got.feedback[0]["correction"] == fixed
    # A reviewer reviews and nothing else; a reader cannot give feedback; another project's
    # reviewer does not see it.
    with pytest.raises(openai.PermissionDeniedError):
        reviewer.chat.completions.create(
            model=DENSE, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    with pytest.raises(openai.PermissionDeniedError):
        reviewer.files.list()
    with pytest.raises(openai.PermissionDeniedError):
        reader.post(
            f"/chat/completions/{reply.id}/feedback",
            body={"metric": "rating", "value": "good"},
            cast_to=object,
        )
    with pytest.raises(openai.NotFoundError):
        sdk("b-reviewer").post(
            f"/chat/completions/{reply.id}/feedback",
            body={"metric": "rating", "value": "good"},
            cast_to=object,
        )


def test_an_admin_acts_in_any_project_with_the_sdks_project_option(
    gateway_url: str, admin_key: str, sdk: Any, lab: dict[str, Any]
) -> None:
    a, b = lab["a"]["id"], lab["b"]["id"]
    made = sdk("a-member").files.create(file=("a.txt", b"Toluene.\n"), purpose="assistants")
    in_a = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=admin_key, project=a)
    assert in_a.files.retrieve(made.id).id == made.id
    own = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=admin_key)
    with pytest.raises(openai.NotFoundError):
        own.files.retrieve(made.id)  # without `project=`, the admin's own project
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk("a-member", project=b).files.list()  # only an admin changes project
    assert denied.value.code == "mismatched_project"
    with pytest.raises(openai.NotFoundError) as missing:
        openai.OpenAI(
            base_url=f"{gateway_url}/v1", api_key=admin_key, project="proj_nowhere"
        ).files.list()
    assert missing.value.code == "project_not_found"
    assert sdk("a-member", project=a).files.retrieve(made.id).id == made.id  # its own: fine
    in_a.files.delete(made.id)
    for c in (in_a, own):
        c.close()


def test_service_accounts_roles_changed_in_place_and_archiving_with_its_audit_trail(
    gateway_url: str, admin_key: str, admin: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    project = admin("POST", "/admin/projects", json={"name": f"temp {tag}"})
    pid = project["id"]
    assert project["object"] == "organization.project" and project["status"] == "active"
    renamed = admin("POST", f"/admin/projects/{pid}", json={"name": f"kinetics {tag}"})
    assert renamed["name"] == f"kinetics {tag}"
    app = admin(
        "POST",
        "/admin/keys",
        json={"project_id": pid, "service_account": True, "role": "reader", "name": "indexer"},
    )
    assert (app["role"], app["service_account"], app["project_id"]) == ("reader", True, pid)
    headers = {"authorization": f"Bearer {app['key']}"}
    r = httpx.post(
        f"{gateway_url}/v1/vector_stores", headers=headers, json={"name": "x"}, timeout=30
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    admin("POST", f"/admin/keys/{app['id']}", json={"role": "member"})  # in place, at once
    r = httpx.post(
        f"{gateway_url}/v1/vector_stores", headers=headers, json={"name": "x"}, timeout=30
    )
    assert r.status_code == 200, r.text
    for bad in (
        {"project_id": pid, "service_account": True, "role": "admin"},
        {"project_id": pid, "role": "owner"},
        {"project_id": "proj_nowhere"},
        {"project_id": pid, "owner": "someone-else"},
    ):
        r = httpx.post(
            f"{gateway_url}/admin/keys",
            headers={"authorization": f"Bearer {admin_key}"},
            json=bad,
            timeout=30,
        )
        assert r.status_code in (400, 404), (bad, r.status_code)
    r = httpx.post(
        f"{gateway_url}/admin/keys/{app['id']}",
        headers={"authorization": f"Bearer {admin_key}"},
        json={"role": "reviewer"},  # a service account is a member or a reader
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "role"

    own = httpx.post(
        f"{gateway_url}/admin/keys",
        headers={"authorization": f"Bearer {admin_key}"},
        json={"project_id": pid, "role": "admin", "name": "pi"},
        timeout=30,
    ).json()
    r = httpx.post(
        f"{gateway_url}/admin/projects/{pid}/archive",
        headers={"authorization": f"Bearer {own['key']}"},
        timeout=30,
    )
    assert r.status_code == 409  # an admin cannot lock itself out with its project
    archived = admin("POST", f"/admin/projects/{pid}/archive")
    assert archived["status"] == "archived" and archived["archived_at"]
    r = httpx.get(f"{gateway_url}/v1/vector_stores", headers=headers, timeout=30)
    assert r.status_code == 401  # its keys went with it
    r = httpx.post(
        f"{gateway_url}/admin/keys",
        headers={"authorization": f"Bearer {admin_key}"},
        json={"project_id": pid},
        timeout=30,
    )
    assert r.status_code == 409
    listed = admin("GET", "/admin/projects")["data"]
    assert pid not in {p["id"] for p in listed}
    everything = admin("GET", "/admin/projects", params={"include_archived": "true"})["data"]
    assert pid in {p["id"] for p in everything}

    def actions(target: str) -> list[str]:
        events = admin("GET", "/admin/audit", params={"target": target, "order": "asc"})["data"]
        return [e["action"] for e in events]

    assert actions(pid) == ["project.create", "project.update", "project.archive"]
    assert actions(app["id"]) == ["key.create", "key.update"]
    assert actions(own["id"]) == ["key.create"]
    events = admin("GET", "/admin/audit", params={"target": pid, "action": "project.archive"})
    assert events["data"][0]["detail"] == {"keys_revoked": 2}
