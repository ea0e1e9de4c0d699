"""Tenants' policies at the gateway, without a network: the keys file's fields, the class a request
may ask for, and the line a tenant's requests wait in beyond its max_concurrent."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.auth import ApiKeys, hash_key
from services.gateway.tenants import PolicyError, TenantGate, TenantPolicy, TenantQueueFull


def test_keys_file_lines_carry_the_tenants_policy(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# tenants\nacme {hash_key('k1')} priority=batch weight=2.5 max_concurrent=3 max_queued=7\n"
                    f"acme {hash_key('k2')} priority=2 weight=2.5 max_concurrent=3 max_queued=7\n"
                    f"solo {hash_key('k3')}\n")
    api = ApiKeys.from_file(keys)
    assert api.authenticate("k2") == "acme" and api.tenants == ("acme", "solo")
    assert api.policy("acme") == TenantPolicy(priority=2, weight=2.5, max_concurrent=3, max_queued=7)
    assert api.policy("solo") == TenantPolicy() == api.policy("unknown")


@pytest.mark.parametrize("fields,fragment", [
    ("priority=urgent", "priority 'urgent' is not a class: 0 interactive, 1 standard, 2 batch"),
    ("weight=0", "weight must be a positive number"),
    ("weight=nan", "weight must be a positive number"),
    ("max_concurrent=-1", "max_concurrent must be >= 0"),
    ("colour=blue", "unknown field 'colour'"),
])
def test_a_bad_policy_names_its_line(tmp_path, fields, fragment):
    keys = tmp_path / "keys"
    keys.write_text(f"\nacme {hash_key('k')} {fields}\n")
    with pytest.raises(ValueError, match=f"keys:2: .*{fragment}"):
        ApiKeys.from_file(keys)


def test_two_policies_for_one_tenant_are_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"acme {hash_key('a')} weight=1\nacme {hash_key('b')} weight=2\n")
    with pytest.raises(ValueError, match="keys:2: tenant 'acme' has another policy"):
        ApiKeys.from_file(keys)


def test_a_request_may_lower_its_class_but_not_raise_it():
    standard = TenantPolicy(priority=1)
    assert standard.resolve_priority(None, "acme") == 1
    assert standard.resolve_priority(2, "acme") == 2
    with pytest.raises(PolicyError, match=r"priority 0 \(interactive\) is above the ceiling of tenant 'acme', 1 \(standard\)"):
        standard.resolve_priority(0, "acme")
    with pytest.raises(PolicyError, match="priority 3 is not a class"):
        standard.resolve_priority(3, "acme")


async def _until(condition, rounds: int = 1000) -> None:
    """Let the event loop run until condition() holds (bounded: it fails the test otherwise)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition did not come true")


def test_beyond_max_concurrent_requests_wait_in_order_up_to_max_queued():
    async def scenario():
        gate, policy = TenantGate(), TenantPolicy(max_concurrent=1, max_queued=2)
        entered: list[str] = []
        release = {name: asyncio.Event() for name in "abc"}

        async def request(name: str):
            async with gate.enter("acme", policy, timeout_s=10) as waited:
                entered.append(name)
                await release[name].wait()
                return waited

        first = asyncio.create_task(request("a"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(request(n)) for n in "bc"]
        await asyncio.sleep(0)
        assert entered == ["a"] and gate.queued["acme"] == 2 and gate.running["acme"] == 1
        with pytest.raises(TenantQueueFull, match="1 requests running and 2 waiting"):
            async with gate.enter("acme", policy, timeout_s=10):
                pass
        async with gate.enter("other", policy, timeout_s=10):  # another tenant has its own line
            pass
        for i, name in enumerate("abc"):
            release[name].set()
            await _until(lambda: len(entered) >= min(i + 2, 3))
        waits = [await first] + [await t for t in waiting]
        assert entered == ["a", "b", "c"] and all(w >= 0 for w in waits)  # in arrival order
        # A request whose time runs out in the line leaves it.
        blocker = asyncio.Event()

        async def hold():
            async with gate.enter("acme", policy, timeout_s=10):
                await blocker.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            async with gate.enter("acme", policy, timeout_s=0.05):
                pass
        assert gate.queued["acme"] == 0
        blocker.set()
        await holder

    asyncio.run(scenario())
