"""Reading what the trace sink (services/traces.py) kept, for the tests of tracing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.traces import SpanStore

Spans = list[dict[str, Any]]


def spans_when(
    db: Path, trace_id: str, ready: Callable[[Spans], bool], timeout: float = 30
) -> Spans:
    """The trace's spans once `ready(spans)` holds (each process exports every half second)."""
    store = SpanStore(db)
    deadline = time.monotonic() + timeout
    try:
        while not ready(spans := store.trace(trace_id)):
            assert time.monotonic() < deadline, [(s["service"], s["name"]) for s in spans]
            time.sleep(0.3)
    finally:
        store.close()
    return spans


def ancestors(span: dict[str, Any], spans: Spans) -> list[dict[str, Any]]:
    """The spans above `span`, nearest first (up to the first whose parent was not received)."""
    by_id = {s["span_id"]: s for s in spans}
    chain = []
    while span["parent_span_id"] in by_id:
        span = by_id[span["parent_span_id"]]
        chain.append(span)
    return chain


def search_then_chemistry_is_one_trace(db: Path, run: dict[str, Any]) -> None:
    """tests/integration/test_agent.py's scripted run (search, molecule_info, an answer: three
    model calls) is one trace (the one its creating request started): under `agent.run`, each
    model call reaches the gateway, the search reaches retrieval, and the chemistry tool's span
    is there, each under the right parent."""

    def whole(spans: Spans) -> bool:
        named = [(s["service"], s["name"]) for s in spans]
        return (
            named.count(("gateway", "POST /v1/chat/completions")) == 3
            and named.count(("agent", "agent.model_call")) == 3
            and {("agent", "agent.run"), ("agent", "agent.tool molecule_info")} <= set(named)
            and any(s == "retrieval" and n.endswith("/search") for s, n in named)
        )

    spans = spans_when(db, run["trace_id"], whole, timeout=20)
    by_id = {s["span_id"]: s for s in spans}

    def above(span: dict[str, Any]) -> list[str]:
        return [s["name"] for s in ancestors(span, spans)]

    (root,) = [s for s in spans if s["name"] == "agent.run"]
    assert root["attributes"]["crucible.run_id"] == run["id"]
    tools = {s["name"]: s for s in spans if s["name"].startswith("agent.tool ")}
    assert set(tools) == {"agent.tool search_documents", "agent.tool molecule_info"}
    for span in tools.values():
        assert by_id[span["parent_span_id"]] is root
    searched = [s for s in spans if s["service"] == "retrieval" and s["name"].endswith("/search")]
    assert searched and all("agent.tool search_documents" in above(s) for s in searched)
    for hop in [s for s in spans if s["name"] == "POST /v1/chat/completions"]:
        assert above(hop)[:2] == ["agent.model_call", "agent.run"]
