"""Model aliases through a real gateway and finetune service, with the official SDK: weighted and
sticky routing, pins, revisions (promote, rollback), the evaluation gate and the guard that rolls
a failing candidate back by itself. The targets are fake models at the network boundary
(tests/fakes): `fake` and `fake-b` answer, `fake-500` always fails."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Lifecycle


@pytest.fixture(scope="module")
def client(lifecycle: Lifecycle) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{lifecycle.gw.url}/v1", api_key=lifecycle.key, max_retries=0)
    yield c
    c.close()


def api(client: openai.OpenAI, method: str, path: str, body: Any = None) -> Any:
    """Crucible's own routes with the SDK's generic request methods."""
    if method == "get":
        return client.get(path, cast_to=object)
    if method == "delete":
        return client.delete(path, cast_to=object)
    return client.post(path, body=body or {}, cast_to=object)


def new_alias(client: openai.OpenAI, routes: dict[str, float], **more: Any) -> str:
    name = f"chem-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "routes": [{"model": m, "weight": w} for m, w in routes.items()], **more}
    made = api(client, "post", "/model_aliases", body)
    assert made["revision"] == 1 and made["name"] == name
    return name


def served(client: openai.OpenAI, model: str, who: str | None = None) -> str:
    """Which model answered a chat through `model` (the header and the body agree)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=1,
        extra_body={"safety_identifier": who} if who else None,
    )
    answer = raw.parse()
    assert raw.headers["x-crucible-model"] == answer.model
    return answer.model


def until(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` holds (fails after `timeout`)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def known(client: openai.OpenAI, name: str) -> bool:
    return name in {m.id for m in client.models.list()}


def test_an_alias_splits_by_weight_and_keeps_each_user_on_one_target(
    client: openai.OpenAI,
) -> None:
    name = new_alias(client, {"fake": 90, "fake-b": 10}, sticky="user")
    assert until(lambda: known(client, name), 5, "every gateway routes a new alias") < 5
    targets: dict[str, set[str]] = {}
    for _ in range(2):
        for i in range(200):
            who = f"user-{i}"
            targets.setdefault(who, set()).add(served(client, name, who))
    assert all(len(t) == 1 for t in targets.values()), "an identifier switched target"
    share = Counter(next(iter(t)) for t in targets.values())["fake-b"] / 200
    assert 0.05 <= share <= 0.15, share


def test_an_alias_is_listed_for_its_owner_and_no_one_else(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    name = new_alias(client, {"fake": 1})
    until(lambda: known(client, name), 5, "the alias is listed")
    card: Any = client.models.retrieve(name)
    assert card.owned_by == "lab-alice" and card.alias["routes"] == [{"model": "fake", "weight": 1}]
    bob = openai.OpenAI(base_url=f"{lifecycle.gw.url}/v1", api_key=lifecycle.other_key)
    assert name not in {m.id for m in bob.models.list()}
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        served(bob, name)
    with pytest.raises(openai.NotFoundError):
        api(bob, "get", f"/model_aliases/{name}")
    with pytest.raises(openai.NotFoundError):
        api(bob, "post", f"/model_aliases/{name}/promote", {"model": "fake"})
    bob.close()


def test_weight_zero_is_reached_only_when_pinned(client: openai.OpenAI) -> None:
    name = new_alias(client, {"fake": 100, "fake-b": 0}, sticky="none")
    until(lambda: known(client, name), 5, "the alias is listed")
    assert {served(client, name) for _ in range(40)} == {"fake"}
    assert served(client, f"{name}@fake-b") == "fake-b"
    with pytest.raises(openai.NotFoundError):
        served(client, f"{name}@fake-500")  # not one of its targets


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"name": "fake", "routes": [{"model": "fake-b", "weight": 1}]}, 409, "name"),
        ({"name": "a:b", "routes": [{"model": "fake", "weight": 1}]}, 400, "name"),
        ({"name": "x", "routes": [{"model": "nope", "weight": 1}]}, 400, "routes[0].model"),
        ({"name": "x", "routes": [{"model": "fake", "weight": 0}]}, 400, "routes"),
        (
            {
                "name": "x",
                "routes": [{"model": "fake", "weight": 1}, {"model": "fake", "weight": 1}],
            },
            400,
            "routes[1].model",
        ),
        ({"name": "x", "routes": []}, 400, None),
        ({"name": "x", "routes": [{"model": "fake", "weight": 1}], "sticky": "ip"}, 400, None),
        ({"name": "x", "routes": [{"model": "fake", "weight": 1}], "guard": {}}, 400, None),
    ],
)
def test_bad_aliases_are_refused(
    client: openai.OpenAI, body: dict[str, Any], status: int, param: str | None
) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        api(client, "post", "/model_aliases", body)
    assert err.value.status_code == status, err.value.message
    if param:
        assert err.value.body["param"] == param  # type: ignore[index]


def test_an_alias_cannot_route_to_an_alias_or_be_made_twice(client: openai.OpenAI) -> None:
    name = new_alias(client, {"fake": 1})
    with pytest.raises(openai.ConflictError):
        api(
            client,
            "post",
            "/model_aliases",
            {"name": name, "routes": [{"model": "fake", "weight": 1}]},
        )
    with pytest.raises(openai.BadRequestError):
        api(
            client,
            "post",
            "/model_aliases",
            {"name": "y" + name, "routes": [{"model": name, "weight": 1}]},
        )


def test_promote_and_rollback_are_revisions_every_gateway_applies(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    name = new_alias(client, {"fake": 100}, sticky="none", reason="first")
    until(lambda: known(client, name), 5, "the alias is listed")
    canary = api(
        client, "post", f"/model_aliases/{name}/promote", {"model": "fake-b", "weight": 10}
    )
    assert canary["revision"] == 2 and canary["shares"] == {"fake-b": 0.1, "fake": 0.9}
    full = api(
        client, "post", f"/model_aliases/{name}/promote", {"model": "fake-b", "reason": "won"}
    )
    assert full["revision"] == 3 and full["shares"] == {"fake-b": 1.0, "fake": 0.0}
    took = until(lambda: all(served(client, name) == "fake-b" for _ in range(10)), 5, "promoted")
    assert took < 5
    back = api(client, "post", f"/model_aliases/{name}/rollback", {"reason": "regressed"})
    assert back["revision"] == 4 and back["shares"] == canary["shares"]
    back = api(client, "post", f"/model_aliases/{name}/rollback")
    assert back["revision"] == 5 and back["routes"] == [{"model": "fake", "weight": 100.0}]
    until(lambda: all(served(client, name) == "fake" for _ in range(10)), 5, "rolled back")
    revisions = api(client, "get", f"/model_aliases/{name}/revisions?order=asc")["data"]
    assert [(r["number"], r["action"], r["restored"]) for r in revisions] == [
        (1, "create", None),
        (2, "promote", None),
        (3, "promote", None),
        (4, "rollback", 2),
        (5, "rollback", 1),
    ]
    assert [r["reason"] for r in revisions][:4] == ["first", None, "won", "regressed"]
    assert all(r["actor"].startswith("key_") or r["actor"] for r in revisions)
    with pytest.raises(openai.ConflictError):
        api(client, "post", f"/model_aliases/{name}/rollback", {"revision": 9})
    assert api(client, "delete", f"/model_aliases/{name}")["deleted"]
    until(lambda: not known(client, name), 5, "a deleted alias is gone")
    admin = openai.OpenAI(base_url=lifecycle.gw.url, api_key=lifecycle.admin_key, max_retries=0)
    log = admin.get(f"/admin/audit?target={name}&order=asc", cast_to=object)["data"]  # type: ignore[index]
    assert [e["action"] for e in log] == [
        "alias.create",
        "alias.promote",
        "alias.promote",
        "alias.rollback",
        "alias.rollback",  # the refused one (409) is not there
        "alias.delete",
    ]
    assert {e["actor_owner"] for e in log} == {"lab-alice"} and all(
        e["actor"].startswith("key_") for e in log
    )


QA: Any = {
    "type": "custom",
    "item_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    "include_sample_schema": True,
}


def eval_on(client: openai.OpenAI, eval_id: str, model: str) -> str:
    run = client.evals.runs.create(
        eval_id,
        data_source={
            "type": "completions",
            "model": model,
            "input_messages": {
                "type": "template",
                "template": [{"role": "user", "content": "{{item.q}}"}],
            },
            "source": {
                "type": "file_content",
                "content": [{"item": {"q": f"q{i}"}} for i in range(5)],
            },
        },
    )
    until(
        lambda: client.evals.runs.retrieve(run.id, eval_id=eval_id).status == "completed",
        30,
        "the eval run completes",
    )
    return run.id


def test_two_gateway_processes_route_an_alias_alike_through_its_revisions(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    """A second gateway process on the same key database and finetune service (as
    CRUCIBLE_REPLICAS=2 runs them): each revision reaches both within their alias refresh."""
    from tests.processes import gateway

    var = lifecycle.gw.log.parent  # the first gateway's var dir: the same key database
    settings = {"finetune_url": lifecycle.finetune.url, "alias_refresh_s": 1.0}
    with gateway(var, [lifecycle.fake.url], lifecycle.gateway_redis, **settings) as second:
        other = openai.OpenAI(base_url=f"{second.url}/v1", api_key=lifecycle.key, max_retries=0)
        name = new_alias(client, {"fake": 100}, sticky="none")
        until(lambda: known(client, name) and known(other, name), 5, "the alias on both")
        for target, change in (
            ("fake-b", {"model": "fake-b"}),
            ("fake", None),
        ):
            if change:
                api(client, "post", f"/model_aliases/{name}/promote", change)
            else:
                api(client, "post", f"/model_aliases/{name}/rollback")
            for c in (client, other):
                until(lambda c=c, t=target: all(served(c, name) == t for _ in range(5)), 5, target)
        other.close()


def test_the_gate_needs_a_passing_run_unless_an_admin_forces(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    ev = client.evals.create(
        data_source_config=QA,
        testing_criteria=[
            {
                "type": "string_check",
                "name": "answers ok",
                "input": "{{sample.output_text}}",
                "reference": "ok",
                "operation": "eq",
            }
        ],
    )
    name = new_alias(client, {"fake": 100}, gate={"eval_id": ev.id, "min_pass_rate": 0.8})
    with pytest.raises(openai.ConflictError) as err:
        api(client, "post", f"/model_aliases/{name}/promote", {"model": "fake-b", "weight": 10})
    assert err.value.body["code"] == "gate_run_missing" and ev.id in err.value.message  # type: ignore[index]
    passing = eval_on(client, ev.id, "fake-b")
    canary = api(
        client, "post", f"/model_aliases/{name}/promote", {"model": "fake-b", "weight": 10}
    )
    assert canary["revision"] == 2
    failing = eval_on(client, ev.id, "fake-500")
    with pytest.raises(openai.ConflictError) as err:
        api(client, "post", f"/model_aliases/{name}/promote", {"model": "fake-500", "weight": 5})
    assert err.value.body["code"] == "gate_failed" and failing in err.value.message  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        api(
            client,
            "post",
            f"/model_aliases/{name}/promote",
            {"model": "fake-500", "weight": 5, "force": True},
        )
    admin = openai.OpenAI(base_url=f"{lifecycle.gw.url}/v1", api_key=lifecycle.admin_key)
    forced = api(
        admin,
        "post",
        f"/model_aliases/{name}/promote",
        {"model": "fake-500", "weight": 5, "force": True, "reason": "debugging"},
    )
    admin.close()
    assert forced["revision"] == 3
    revisions = api(client, "get", f"/model_aliases/{name}/revisions")["data"]
    newest, canary_rev = revisions[0], revisions[1]
    assert newest["forced"] and newest["reason"] == "debugging"
    assert canary_rev["evidence"]["fake-b"] == {"run_id": passing, "pass_rate": 1.0}


def finetune_metric(lifecycle: Lifecycle, name: str, labels: str) -> float:
    text = httpx.get(f"{lifecycle.finetune.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_guard_rolls_back_a_failing_candidate_by_itself(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    guard = {"window_s": 60, "min_requests": 5, "max_error_ratio": 0.2}
    name = new_alias(client, {"fake": 100}, sticky="none", guard=guard)
    until(lambda: known(client, name), 5, "the alias is listed")
    label = f'alias="lab-alice/{name}"'
    before = finetune_metric(lifecycle, "crucible_alias_rollbacks_total", label)
    api(client, "post", f"/model_aliases/{name}/promote", {"model": "fake-500", "weight": 50})
    start, ok, failed = time.monotonic(), 0, 0
    while api(client, "get", f"/model_aliases/{name}")["revision"] == 2:
        assert time.monotonic() - start < 30, "not rolled back within 30 s"
        try:
            assert served(client, name) == "fake"
            ok += 1
        except openai.InternalServerError:
            failed += 1
    assert ok > 0 and failed > 0  # the stable target answered throughout

    def healed() -> bool:
        try:
            return {served(client, name) for _ in range(20)} == {"fake"}
        except openai.InternalServerError:
            return False

    until(healed, 5, "every gateway applies the rollback")
    newest = api(client, "get", f"/model_aliases/{name}/revisions")["data"][0]
    assert newest["action"] == "auto_rollback" and newest["actor"] == "guard"
    assert newest["restored"] == 1 and newest["evidence"]["bar"] == "error_ratio"
    assert newest["evidence"]["target"] == "fake-500" and newest["evidence"]["error_ratio"] > 0.2
    after = finetune_metric(lifecycle, "crucible_alias_rollbacks_total", label)
    assert after == before + 1


def test_agent_and_eval_runs_take_an_alias_like_a_model(
    client: openai.OpenAI, lifecycle: Lifecycle
) -> None:
    """The agent asks the gateway for the alias (listed) and calls it; an eval run samples it."""
    name = new_alias(client, {"scripted": 100})
    until(lambda: known(client, name), 5, "the alias is listed")
    lifecycle.script({"content": '{"action": "final_answer", "answer": "C9H8O4", "citations": []}'})
    run = api(
        client,
        "post",
        "/agent/runs",
        {"model": name, "messages": [{"role": "user", "content": "Aspirin's formula?"}]},
    )
    deadline = time.monotonic() + 30
    while (run := api(client, "get", f"/agent/runs/{run['id']}"))["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, "the agent run did not finish"
        time.sleep(0.1)
    assert run["status"] == "completed" and run["output"]["answer"] == "C9H8O4"
    assert [r["model"] for r in lifecycle.seen()] == ["scripted"]  # the engine got the target
    ev = client.evals.create(
        data_source_config=QA,
        testing_criteria=[
            {
                "type": "string_check",
                "name": "ok",
                "input": "{{sample.output_text}}",
                "reference": "ok",
                "operation": "eq",
            }
        ],
    )
    lifecycle.script({"content": "ok", "repeat": True})
    sampled = client.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": name,
            "source": {"type": "file_content", "content": [{"item": {"q": "q"}}]},
            "input_messages": {
                "type": "template",
                "template": [{"role": "user", "content": "{{item.q}}"}],
            },
        },
    )
    until(
        lambda: client.evals.runs.retrieve(sampled.id, eval_id=ev.id).status == "completed",
        30,
        "the eval run completes",
    )
    [item] = client.evals.runs.output_items.list(sampled.id, eval_id=ev.id)
    assert item.status == "pass" and item.sample.model == "scripted"
