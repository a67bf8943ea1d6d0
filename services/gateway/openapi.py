"""The gateway's OpenAPI document: FastAPI's for the cold routes, plus the two proxied routes
(served by the ASGI hot path, so FastAPI does not see them), with our real error responses.

Request schemas cover what the gateway itself checks; other OpenAI and vLLM fields pass through
(additionalProperties), as OpenAI's own schema allows.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway.config import GatewaySettings

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_STATUSES = {
    "400": "Invalid request (the param is named)",
    "401": "Missing or wrong API key",
    "403": "Not allowed for this key",
    "404": "Unknown or foreign id, or model",
    "405": "Method not allowed",
    "408": "Body not received in time",
    "413": "Body too large",
    "429": "Limited (see retry-after)",
    "502": "The backend broke",
    "503": "No backend reachable",
    "504": "Backend timed out",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        c: {"description": ERROR_STATUSES[c], "content": {"application/json": {"schema": ERROR}}}
        for c in codes
    }


def _components(s: GatewaySettings) -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    tokens = {"type": "integer", "minimum": 1, "maximum": s.max_tokens_cap}
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "user", "assistant", "developer"]},
            "content": {"type": "string"},
        },
    }
    common = {
        "model": {"type": "string", "minLength": 1},
        "max_tokens": tokens,
        "n": {"type": "integer", "minimum": 1, "maximum": s.max_n},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    }
    return {
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": nullable_str,
                        "code": nullable_str,
                    },
                }
            },
        },
        "CreateChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                **common,
                "messages": {"type": "array", "minItems": 1, "items": message},
                "max_completion_tokens": tokens,
            },
        },
        "CreateCompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "properties": {**common, "prompt": {"type": "string", "minLength": 1}},
        },
        "CompletionResponse": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": usage,
            },
        },
    }


def _proxied(request: str, summary: str) -> dict[str, Any]:
    ok = {
        "application/json": {"schema": {"$ref": "#/components/schemas/CompletionResponse"}},
        "text/event-stream": {"schema": {"type": "string"}},
    }
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
                },
            },
            "responses": {
                "200": {"description": "OK (a stream when `stream` is true)", "content": ok},
                **_errors("400", "401", "404", "405", "408", "413", "429", "502", "503", "504"),
            },
        }
    }


def build_openapi(app: FastAPI, s: GatewaySettings) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400 in the OpenAI envelope
            responses.update(_errors("400", "401", "403", "404"))
            op["security"] = [{"bearer": []}]
    doc["paths"]["/v1/chat/completions"] = _proxied(
        "CreateChatCompletionRequest", "Create a chat completion"
    )
    doc["paths"]["/v1/completions"] = _proxied("CreateCompletionRequest", "Create a completion")
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(_components(s))
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
