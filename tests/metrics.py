"""Reading a service's Prometheus metrics in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def counted(url: str, family_name: str, **labels: str) -> float:
    """The sum of a counter family's samples with these labels, read from `url`'s /metrics."""
    return sum(
        s.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
        if family.name == family_name
        for s in family.samples
        if s.name.endswith("_total") and labels.items() <= s.labels.items()
    )
