"""Is a vLLM server really serving? `/health` alone is not enough: it can answer 200 while the
engine is dead, so readiness also lists the models and runs a one-token canary request.

Standard library only: this runs in the vLLM image as its healthcheck, too.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


class NotReady(Exception):
    pass


def _call(url: str, body: dict[str, Any] | None, timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    # Only our own http:// URLs reach here (from a profile and a port), never user input.
    headers = {"content-type": "application/json"}
    if key := os.environ.get("VLLM_API_KEY"):  # the key this vLLM was started with
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise NotReady(f"{url} answered {exc.code}") from None
    except (OSError, TimeoutError) as exc:
        raise NotReady(f"{url}: {exc}") from None
    return json.loads(raw) if raw else None


def check(base_url: str, model: str, timeout: float = 5.0) -> None:
    """Raise NotReady with the reason unless health, model list and a canary all succeed."""
    base = base_url.rstrip("/")
    _call(f"{base}/health", None, timeout)
    listed = _call(f"{base}/v1/models", None, timeout) or {}
    ids = [m.get("id") for m in listed.get("data", [])]
    if model not in ids:
        raise NotReady(f"model {model!r} not listed (have {ids})")
    canary = {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
    out = _call(f"{base}/v1/completions", canary, timeout)
    if not out or not out.get("choices"):
        raise NotReady("canary completion returned no choices")


def is_ready(base_url: str, model: str, timeout: float = 5.0) -> bool:
    try:
        check(base_url, model, timeout)
    except NotReady:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Healthcheck: exit 0 when the profile's server is ready (CRUCIBLE_INFERENCE_* defaults)."""
    import argparse

    from services.inference import profiles

    p = argparse.ArgumentParser(description="Exit 0 if the vLLM server really serves.")
    p.add_argument("--profile", default=os.environ.get("CRUCIBLE_INFERENCE_PROFILE", "cpu-dev"))
    port = os.environ.get("CRUCIBLE_INFERENCE_PORT", "8000")
    p.add_argument("--url", default=f"http://127.0.0.1:{port}")
    args = p.parse_args(argv)
    try:
        check(args.url, profiles.load(args.profile).served_model_name)
    except (NotReady, profiles.ProfileError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
