"""One model-lifecycle stack for the integration tests that need a model answering from a script
(tests/fakes) behind the real gateway, finetune service, eval worker and agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.stack import Stack
from services.stackconfig import _free_port
from tests.processes import Proc, eval_worker, fake_upstream, gateway, make_key, service


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A fake model upstream (tests/fakes/openai_server.py) for one module's gateways."""
    with fake_upstream(tmp_path_factory.mktemp("fake")) as f:
        yield f


@dataclass
class Lifecycle:
    fake: Proc
    gw: Proc
    finetune: Proc
    key: str
    other_key: str
    admin_key: str
    gateway_redis: str  # the Redis database the gateway counts in (a second one shares it)

    def script(self, *replies: dict[str, Any]) -> None:
        httpx.post(f"{self.fake.url}/script", json={"replies": list(replies)}).raise_for_status()

    def seen(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = httpx.get(f"{self.fake.url}/script").json()["requests"]
        return requests


STORED_QUOTA = 1_000_000  # bytes of stored completions and responses per owner


@pytest.fixture(scope="session")
def lifecycle(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    stack.up(["redis", "milvus", "retrieval"], echo=lambda _: None)
    redis = f"redis://127.0.0.1:{stack.config.ports.redis}"
    retrieval_url = f"http://127.0.0.1:{stack.config.ports.retrieval}"
    tmp = tmp_path_factory.mktemp("lifecycle")
    agent_port, finetune_port = _free_port(), _free_port()
    with fake_upstream(tmp) as fake:
        # Redis databases of its own: the stack's finetune service reads the stack's streams.
        finetune: dict[str, object] = {
            "redis_url": f"{redis}/11",
            "captures_redis_url": f"{redis}/12",
            "retrieval_url": retrieval_url,
            "inference_urls": json.dumps([fake.url]),
            "eval_concurrency": 1,  # items in order, so the script's replies meet them in order
            "alias_guard_every_s": 1,
            # Small, for the stored-data quota test (test_quotas.py); far above other owners'.
            "owner_stored_bytes": STORED_QUOTA,
            "stored_quota_every_s": 0.2,
        }
        with (
            gateway(
                tmp,
                [fake.url],
                f"{redis}/12",
                retrieval_url=retrieval_url,
                agent_url=f"http://127.0.0.1:{agent_port}",
                finetune_url=f"http://127.0.0.1:{finetune_port}",
                routing_refresh_s=0.5,
                quota_refresh_s=0.2,
            ) as gw,
            service(
                "agent",
                tmp,
                {"retrieval_url": retrieval_url, "gateway_url": gw.url},
                ready="/ready",
                port=agent_port,
                timeout=60,
            ),
            service(
                "finetune", tmp, finetune := {**finetune, "gateway_url": gw.url}, port=finetune_port
            ) as ft,
            eval_worker(tmp, finetune),
        ):
            yield Lifecycle(
                fake,
                gw,
                ft,
                # Above the default 600/min: the alias tests send about a thousand requests.
                make_key(tmp, "lab-alice", rpm=10_000),
                make_key(tmp, "lab-bob"),
                make_key(tmp, "lab-alice", admin=True, rpm=10_000),  # alice's own admin key
                f"{redis}/12",
            )
