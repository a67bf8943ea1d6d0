"""The cpu-dev profile's real vLLM server, called with the official openai client."""

import asyncio
import json

import jsonschema
import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from bench import structured_outputs as structured
from services.stack import Stack
from tests.conftest import DENSE, planner_vs_vllm

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the molecular weight of water?"}
]


def test_models_list_has_the_dev_model(vllm_client: openai.OpenAI) -> None:
    assert DENSE in [m.id for m in vllm_client.models.list()]


def test_chat_completion_returns_text_and_usage(vllm_client: openai.OpenAI) -> None:
    r = vllm_client.chat.completions.create(model=DENSE, messages=MESSAGES, max_tokens=8)
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


def test_streamed_chat_reports_usage_in_a_final_chunk(vllm_client: openai.OpenAI) -> None:
    stream = vllm_client.chat.completions.create(
        model=DENSE,
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c for c in chunks if c.choices]
    assert len(deltas) >= 2
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_completion_is_deterministic_with_greedy_decoding(vllm_client: openai.OpenAI) -> None:
    a = vllm_client.completions.create(
        model=DENSE, prompt="Benzene is", max_tokens=8, temperature=0
    )
    b = vllm_client.completions.create(
        model=DENSE, prompt="Benzene is", max_tokens=8, temperature=0
    )
    assert a.choices[0].text == b.choices[0].text and a.usage and a.usage.completion_tokens == 8


def test_json_schema_output_parses_and_validates(vllm_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            # A pattern bounds the string: unbounded strings let a random model babble past any
            # token budget.
            "name": {"type": "string", "pattern": "^[A-Za-z0-9 ]{1,16}$"},
            "atoms": {"type": "integer", "minimum": 0, "maximum": 500},
            "aromatic": {"type": "boolean"},
        },
        "required": ["name", "atoms", "aromatic"],
        "additionalProperties": False,
    }
    fmt: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "molecule", "schema": schema, "strict": True},
    }
    for _ in range(5):
        r = vllm_client.chat.completions.create(
            model=DENSE, messages=MESSAGES, max_tokens=200, temperature=1.0, response_format=fmt
        )
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and content is not None
        jsonschema.validate(json.loads(content), schema)


def test_three_hundred_json_schema_answers_are_strictly_valid_json(inference_url: str) -> None:
    """At temperature 1 a random model tries every token the grammar allows: a raw control
    character inside a string (which strict JSON forbids) came through xgrammar in half the
    answers. Answers stopped at `max_tokens` are unfinished by design and counted apart."""
    counts = asyncio.run(structured.answers(inference_url, DENSE, 300, 16))
    assert counts["error"] == 0 and counts["finished"] >= 250, counts
    assert counts["not_strict_json"] == counts["not_schema"] == 0, counts


def test_the_planner_predicts_the_kv_cache_vllm_allocates(stack: Stack, inference_url: str) -> None:
    predicted, actual = planner_vs_vllm(stack)
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)
