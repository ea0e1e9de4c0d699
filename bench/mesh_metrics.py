"""A service's Prometheus metrics as numbers, for the benches: totals summed over labels, and the
gateway's internal messages per generated token between two readings. Also the CPU time the mesh's
processes spend outside the engine, which a 2-core machine takes from the model."""

from __future__ import annotations

import os
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from services.model_shard.engine.async_engine import ENGINE_THREAD_NAME


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


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads), from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, str]:
    """A process's threads: id -> name (the engine's are named ENGINE_THREAD_NAME)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except FileNotFoundError:  # it ended meanwhile
            pass
    return out


def serving_cpu(pid: int) -> float:
    """CPU seconds of a process's threads other than the engine's: a shard's event loop and gRPC threads."""
    total = 0.0
    for tid, name in threads(pid).items():
        if name != ENGINE_THREAD_NAME:
            try:
                total += cpu_seconds(pid, tid)
            except FileNotFoundError:
                pass
    return total


def outside_engine_cpu(processes: dict) -> dict[str, float]:
    """CPU seconds so far of the gateway, the shards outside their engine threads, the tokenizer and the
    cache (a Mesh's processes, by name)."""
    return {name: serving_cpu(proc.pid) if name.startswith("shard") else cpu_seconds(proc.pid)
            for name, proc in processes.items()}


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Microseconds of CPU per generated token: the gateway's, and the rest's outside the engine."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    gateway = spent.pop("gateway", 0.0)
    return {"gateway_us_per_token": 1e6 * gateway / tokens, "others_us_per_token": 1e6 * sum(spent.values()) / tokens}
