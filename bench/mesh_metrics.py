"""A service's Prometheus metrics as numbers, for the benches: totals summed over labels, and the
gateway's internal messages per generated token between two readings."""

from __future__ import annotations

from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, float]:
    """Sample name -> value, summed over label sets (e.g. llmmesh_internal_messages_total over peers)."""
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def messages_per_token(before: dict[str, float], after: dict[str, float]) -> float:
    """Messages between the gateway and its backends per completion token returned, in that window."""
    messages = after.get("llmmesh_internal_messages_total", 0) - before.get("llmmesh_internal_messages_total", 0)
    tokens = after.get("llmmesh_generation_tokens_total", 0) - before.get("llmmesh_generation_tokens_total", 0)
    return messages / tokens if tokens else float("nan")
