"""The official openai client through the gateway, in front of the real dev vLLM."""

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from services.gateway.keys import KeyStore
from tests.conftest import DENSE

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a solvent."}]


def test_models_lists_the_dev_model(client: openai.OpenAI) -> None:
    assert DENSE in [m.id for m in client.models.list()]
    assert client.models.retrieve(DENSE).id == DENSE


def test_chat_plain_and_streamed_with_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=DENSE, messages=HI, max_tokens=6)
    assert r.usage is not None and r.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model=DENSE,
            messages=HI,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sum(1 for c in chunks if c.choices) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def _completion_tokens_counted(gateway_url: str) -> float:
    prefix = f'crucible_gateway_tokens_total{{kind="completion",model="{DENSE}"}}'
    lines = httpx.get(f"{gateway_url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def test_a_stream_without_usage_asked_is_counted_and_shows_none(
    client: openai.OpenAI, gateway_url: str
) -> None:
    """vLLM is asked for the usage chunk on every stream; a client that did not ask never sees
    it, and its tokens are counted all the same (they used to be missed)."""
    before = _completion_tokens_counted(gateway_url)
    chunks = list(
        client.chat.completions.create(
            model=DENSE, messages=HI, max_tokens=7, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert _completion_tokens_counted(gateway_url) - before == 7


def test_completion_and_vllm_sampling_extras_pass_through(client: openai.OpenAI) -> None:
    a = client.completions.create(
        model=DENSE,
        prompt="Benzene is",
        max_tokens=8,
        temperature=0,
        extra_body={"top_k": 1, "repetition_penalty": 1.0},
    )
    b = client.completions.create(model=DENSE, prompt="Benzene is", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage and a.usage.completion_tokens == 8


def test_json_schema_output_through_the_gateway(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["ok", "score"],
        "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
        },
    }
    r = client.chat.completions.create(
        model=DENSE,
        messages=HI,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "v", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_errors_are_the_sdks_own_exceptions(gateway_url: str, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-cru-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=DENSE, messages=HI, max_tokens=1)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=1)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=DENSE, messages=HI, max_tokens=10**6)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as relayed:  # vLLM's own 400, relayed
        client.chat.completions.create(model=DENSE, messages=HI, max_tokens=1, temperature=-3)
    assert "temperature" in str(relayed.value.message).lower()


def test_rate_limit_is_the_sdks_rate_limit_error(gateway_url: str, keys: KeyStore) -> None:
    secret, _ = keys.create("limited", rpm=2)
    c = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    for _ in range(2):
        c.completions.create(model=DENSE, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as exc:
        c.completions.create(model=DENSE, prompt="x", max_tokens=1)
    assert int(exc.value.response.headers["retry-after"]) >= 1


def test_key_model_allow_list_hides_other_models(gateway_url: str, keys: KeyStore) -> None:
    secret, _ = keys.create("narrow", models=["some-other-model"])
    c = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    assert DENSE not in [m.id for m in c.models.list()]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=DENSE, messages=HI, max_tokens=1)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/invocations",
        "/sleep",
        "/wake_up",
        "/scale_elastic_ep",
        "/tokenize",
        "/pooling",
        "/reset_prefix_cache",
        "/collective_rpc",
    ],
)
def test_vllm_admin_routes_are_not_reachable(gateway_url: str, admin_key: str, path: str) -> None:
    r = httpx.post(
        f"{gateway_url}{path}",
        json={"lora_name": "x", "lora_path": "/tmp"},
        headers={"authorization": f"Bearer {admin_key}"},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_every_response_carries_a_request_id(gateway_url: str, admin_key: str) -> None:
    h = {"authorization": f"Bearer {admin_key}", "x-request-id": "trace-123"}
    r = httpx.post(
        f"{gateway_url}/v1/completions",
        headers=h,
        json={"model": DENSE, "prompt": "x", "max_tokens": 1},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    r = httpx.get(f"{gateway_url}/v1/models")
    assert r.status_code == 401 and len(r.headers["x-request-id"]) == 32


def test_metrics_count_requests_tokens_and_ttft(client: openai.OpenAI, gateway_url: str) -> None:
    list(
        client.chat.completions.create(
            model=DENSE,
            messages=HI,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = httpx.get(f"{gateway_url}/metrics").text
    assert (
        f'crucible_gateway_requests_total{{model="{DENSE}",route="/v1/chat/completions",status="2xx"}}'
        in text
    )
    tokens = [
        line
        for line in text.splitlines()
        if line.startswith(f'crucible_gateway_tokens_total{{kind="completion",model="{DENSE}"}}')
    ]
    assert tokens and float(tokens[0].rsplit(" ", 1)[1]) >= 3
    assert f'crucible_gateway_time_to_first_token_seconds_count{{model="{DENSE}"}}' in text
