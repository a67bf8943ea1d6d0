"""The whole public API in one OpenAPI document, served by the gateway at `/openapi.json`.

It joins FastAPI's document of the gateway's own routes, the two proxied routes (served by the
ASGI hot path, so FastAPI does not see them), and the forwarded services' routes, read from each
service's own document, all with the error responses the gateway really gives.

Request schemas of the proxied routes cover what the gateway itself checks; other OpenAI and vLLM
fields pass through (additionalProperties), as OpenAI's own schema allows.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway import roles
from services.gateway.config import GatewaySettings
from services.gateway.forward import SERVICE_ROUTES, route_of

log = logging.getLogger("crucible.gateway")

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_STATUSES = {
    "400": "Invalid request (the param is named)",
    "401": "Missing or wrong API key",
    "403": "Not allowed for this key's role (`x-crucible-roles` lists those allowed)",
    "404": "Unknown or foreign id, or model",
    "405": "Method not allowed",
    "408": "Body not received in time",
    "409": "Conflicts with the object's state",
    "413": "Body too large",
    "415": "Unsupported media type",
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
        "CreateResponseRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": common["model"],
                "input": {
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "items": message},
                    ]
                },
                "max_output_tokens": tokens,
                "stream": common["stream"],
                "temperature": common["temperature"],
                "store": {"type": "boolean"},
                "previous_response_id": {"type": "string", "minLength": 1, "maxLength": 200},
            },
        },
        "ResponseObject": {
            "type": "object",
            "required": ["id", "object", "model", "output"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string"},
                "model": {"type": "string"},
                "output": {"type": "array", "items": {"type": "object"}},
            },
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


def _proxied(request: str, summary: str, answer: str = "CompletionResponse") -> dict[str, Any]:
    ok = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}},
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
                **_errors(
                    "400", "401", "403", "404", "405", "408", "413", "429", "502", "503", "504"
                ),
            },
        }
    }


# What the gateway itself may answer on a forwarded route, besides what the service declares.
FORWARDED_ERRORS = [code for code in ERROR_STATUSES if code != "405"]
REF = "#/components/schemas/"


def build_openapi(app: FastAPI, s: GatewaySettings) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400 in the OpenAI envelope
            # Those every route may answer, and those a route declares itself (409, ...).
            declared = [c for c in responses if c in ERROR_STATUSES]
            responses.update(_errors("400", "401", "403", "404", *declared))
            op["security"] = [{"bearer": []}]
    doc["paths"]["/v1/chat/completions"] = _proxied(
        "CreateChatCompletionRequest", "Create a chat completion"
    )
    doc["paths"]["/v1/completions"] = _proxied("CreateCompletionRequest", "Create a completion")
    doc["paths"]["/v1/responses"] = _proxied(
        "CreateResponseRequest", "Create a model response", "ResponseObject"
    )
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(_components(s))
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def merge_service(doc: dict[str, Any], service: str, part: dict[str, Any]) -> None:
    """Add a service's forwarded paths (only those) and the schemas they use to `doc`; a schema
    whose name the document already uses for another shape is renamed `<service>_<name>`."""
    part = copy.deepcopy(part)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    renames = {}
    for name, schema in part.get("components", {}).get("schemas", {}).items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        if name in schemas and schemas[name] != schema:
            renames[name] = f"{service}_{name}"
    if renames:
        part = _renamed(part, renames)
    for name, schema in part.get("components", {}).get("schemas", {}).items():
        if name not in ("HTTPValidationError", "ValidationError"):
            schemas.setdefault(name, schema)
    for path, ops in part.get("paths", {}).items():
        prefix = route_of(path)
        if prefix is None or SERVICE_ROUTES[prefix] != service:
            continue
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400 in the OpenAI envelope
            for code, response in _errors(*FORWARDED_ERRORS).items():
                responses.setdefault(code, response)
            op["security"] = [{"bearer": []}]
        # Merged, not replaced: POST /v1/chat/completions is the proxy's, GET the store's.
        doc["paths"].setdefault(path, {}).update(ops)


def add_roles(doc: dict[str, Any]) -> None:
    """Each operation's `x-crucible-roles`: the key roles allowed to call it (roles.py)."""
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if isinstance(op, dict) and "responses" in op:
                op["x-crucible-roles"] = roles.allowed(roles.needed(method.upper(), path))


def add_links(doc: dict[str, Any]) -> None:
    """OpenAPI links from each create (a POST on a collection answering an object with an `id`)
    to the operations on that object, so clients and the fuzzer can follow a made object."""
    paths = doc["paths"]
    for path, ops in paths.items():
        post = ops.get("post")
        if post is None or path.endswith("}"):
            continue
        known = re.findall(r"{(\w+)}", path)
        for target, target_ops in paths.items():
            rest = target[len(path) :]
            m = re.match(r"/{(\w+)}(/|$)", rest)
            if not target.startswith(path) or m is None:
                continue
            params = {p: f"$request.path.{p}" for p in known} | {m[1]: "$response.body#/id"}
            for method, op in target_ops.items():
                if "operationId" not in op or len(re.findall(r"{\w+}", target)) != len(params):
                    continue
                for code in ("200", "201"):
                    if code in post["responses"]:
                        links = post["responses"][code].setdefault("links", {})
                        links[f"{method}_{op['operationId']}"[:120]] = {
                            "operationId": op["operationId"],
                            "parameters": params,
                        }


def _renamed(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(REF):
                v = REF + renames.get(v[len(REF) :], v[len(REF) :])
            elif k == "schemas" and isinstance(v, dict):
                v = {renames.get(n, n): _renamed(x, renames) for n, x in v.items()}
                out[k] = v
                continue
            out[k] = _renamed(v, renames)
        return out
    if isinstance(node, list):
        return [_renamed(x, renames) for x in node]
    return node


class PublicDocument:
    """The merged document, built on first request and kept once every service answered; while
    one is down its routes are missing and the next request tries again (at most every 5 s)."""

    RETRY_S = 5.0

    def __init__(self, app: FastAPI, s: GatewaySettings) -> None:
        self.app, self.s = app, s
        self.urls = {"retrieval": s.retrieval_url, "finetune": s.finetune_url, "agent": s.agent_url}
        self._doc: dict[str, Any] | None = None
        self._complete = False
        self._tried = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, Any]:
        if self._complete and self._doc is not None:
            return self._doc
        async with self._lock:
            if self._doc is None or (
                not self._complete and time.monotonic() - self._tried > self.RETRY_S
            ):
                self._doc, self._complete = await self._build()
                self._tried = time.monotonic()
        return self._doc

    async def _build(self) -> tuple[dict[str, Any], bool]:
        doc = build_openapi(self.app, self.s)
        token = self.s.internal_token.get_secret_value()
        async with httpx.AsyncClient(
            timeout=3.0, headers={"authorization": f"Bearer {token}"}
        ) as client:
            parts = await asyncio.gather(
                *(client.get(f"{url}/openapi.json") for url in self.urls.values()),
                return_exceptions=True,
            )
        missing = []
        for service, part in zip(self.urls, parts, strict=True):
            if isinstance(part, httpx.Response) and part.status_code == 200:
                merge_service(doc, service, part.json())
            else:
                missing.append(service)
        add_links(doc)
        add_roles(doc)
        if missing:
            log.warning("openapi: services not reachable", extra={"services": missing})
            doc["info"]["x-crucible-missing"] = missing
        return doc, not missing
