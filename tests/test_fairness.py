"""The shard's scheduler under overload, without a model: priority classes, weighted shares between
tenants, work conservation, preemption order and the bound on waiting (engine/fairness.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from services.model_shard.engine.fairness import FairnessConfig
from services.model_shard.engine.kv_blocks import BlockPool
from services.model_shard.engine.request import SamplingParams, Sequence
from services.model_shard.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig

INTERACTIVE, STANDARD, BATCH = 0, 1, 2


def _sched(num_blocks=256, policy="fair", **config) -> Scheduler:
    fairness = FairnessConfig(policy, config.pop("aging_steps", 2000), config.pop("max_preemptions", 2))
    return Scheduler(SchedulerConfig(max_model_len=4096, enable_prefix_caching=False, fairness=fairness, **config),
                     BlockPool(num_blocks, 4))


_ids = iter(range(10**9))


def _seq(tenant: str, priority: int = INTERACTIVE, weight: float = 1.0, prompt: int = 4, max_tokens: int = 40):
    n = next(_ids)
    return Sequence(f"{tenant}-{n}", [1 + n % 50] * prompt, SamplingParams(max_tokens=max_tokens), frozenset(),
                    tenant=tenant, priority=priority, weight=weight)


def _step(sched: Scheduler) -> Counter:
    """One step; the tokens each tenant computed in it."""
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput([7 if s.sample else None for s in out.scheduled],
                                                    [None] * len(out.scheduled)))
    tokens: Counter = Counter()
    for s in out.scheduled:
        tokens[s.seq.tenant] += s.num_new_tokens
    return tokens


def _keep_busy(sched: Scheduler, tenant: str, queued: int, **seq) -> None:
    """Top the tenant up to `queued` requests waiting or running (a flood that never ends)."""
    mine = sum(s.tenant == tenant for s in [*sched.waiting, *sched.running])
    for _ in range(queued - mine):
        sched.add(_seq(tenant, **seq))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)])
def test_weighted_shares_converge_to_the_weights(weights):
    sched = _sched(max_running=4)
    served: Counter = Counter()
    for step in range(400):
        _keep_busy(sched, "a", 12, weight=weights[0])
        _keep_busy(sched, "b", 12, weight=weights[1])
        tokens = _step(sched)
        if step >= 100:  # past the start, over a window of 300 steps
            served += tokens
    ratio = served["b"] / served["a"]
    assert ratio == pytest.approx(weights[1] / weights[0], rel=0.15)


def test_work_conserving_a_tenant_alone_gets_every_slot_and_idle_shares_go_to_others():
    sched = _sched(max_running=4)
    for _ in range(50):
        _keep_busy(sched, "a", 10, weight=1.0)
        _keep_busy(sched, "b", 1, weight=3.0)  # b asks for one slot only; its weight does not reserve more
        _step(sched)
    assert len(sched.running) == 4
    assert Counter(s.tenant for s in sched.running) == {"a": 3, "b": 1}


def test_the_higher_class_goes_first_and_preempts_a_lower_one_for_its_slot():
    sched = _sched(max_running=2)
    batch = [_seq("a", BATCH) for _ in range(3)]
    for s in batch:
        sched.add(s)
    _step(sched)
    assert sched.running == batch[:2]
    urgent = _seq("a", INTERACTIVE)
    sched.add(urgent)
    out = sched.schedule()
    assert urgent in sched.running and out.num_preempted == 1
    assert [s.seq for s in out.scheduled if s.seq is urgent]
    assert sched.waiting[0] in batch and batch[2] in sched.waiting  # the preempted one waits first among its class


def test_a_tenant_that_becomes_active_goes_before_a_backlogged_one():
    """It starts at the backlogged tenant's virtual time; with fewer running it goes first, and takes
    a slot of the tenant over its share at once."""
    sched = _sched(max_running=4)
    for _ in range(20):
        _keep_busy(sched, "a", 10)
        _step(sched)
    newcomer = _seq("b")
    sched.add(newcomer)
    out = sched.schedule()
    assert newcomer in sched.running and out.num_preempted == 1
    assert Counter(s.tenant for s in sched.running) == {"a": 3, "b": 1}


def test_kv_pressure_preempts_the_lowest_class_first_not_the_newest():
    sched = _sched(num_blocks=7, max_running=8, max_preemptions=0)
    standard, batch, interactive = _seq("a", STANDARD, prompt=7), _seq("b", BATCH, prompt=7), _seq("c", prompt=7)
    for s in (standard, batch, interactive):  # the interactive one arrives last
        sched.add(s)
    out = sched.schedule()
    assert len(out.scheduled) == 3
    sched.update_from_output(out, ModelRunnerOutput([7, 7, 7], [None] * 3))
    _step(sched)  # 9 tokens each, 8 computed: the 2 blocks are full
    sched.schedule()  # every sequence needs a third block; one is free
    assert batch in sched.waiting and batch.num_preemptions == 1
    assert standard in sched.running and interactive in sched.running


def test_fcfs_keeps_arrival_order_and_preempts_the_newest():
    sched = _sched(num_blocks=7, policy="fcfs", max_running=8)
    standard, batch, interactive = _seq("a", STANDARD, prompt=7), _seq("b", BATCH, prompt=7), _seq("c", prompt=7)
    for s in (standard, batch, interactive):
        sched.add(s)
    sched.update_from_output(sched.schedule(), ModelRunnerOutput([7, 7, 7], [None] * 3))
    _step(sched)
    sched.schedule()
    assert interactive in sched.waiting and batch in sched.running


def test_the_lowest_class_waits_at_most_its_aging_bound():
    """Under a flood of interactive work that never ends, a batch request is admitted within
    class x aging_steps steps plus one running request's length."""
    aging, length = 10, 6
    sched = _sched(max_running=1, aging_steps=aging)
    late = _seq("b", BATCH, max_tokens=length)
    sched.add(late)
    waited = 0
    while late.times.scheduled_ns is None and waited < 200:
        _keep_busy(sched, "a", 3, max_tokens=length)
        _step(sched)
        waited += 1
    assert late.times.scheduled_ns is not None and waited <= BATCH * aging + length + 1


def test_one_tenant_and_one_class_schedule_as_first_come_first_served():
    """What the fair policy does with a single tenant in a single class is what fcfs does, step by step,
    preemptions included."""
    def run(policy: str) -> list:
        sched = _sched(num_blocks=10, policy=policy, max_running=3)
        for i in range(6):
            sched.add(Sequence(f"r{i}", [1 + i] * 5, SamplingParams(max_tokens=9), frozenset(), tenant="a"))
        steps = []
        while sched.has_work:
            out = sched.schedule()
            steps.append(([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled], out.num_preempted))
            sched.update_from_output(out, ModelRunnerOutput([7 if s.sample else None for s in out.scheduled],
                                                            [None] * len(out.scheduled)))
        return steps

    fair = run("fair")
    assert fair == run("fcfs") and any(preempted for _, preempted in fair)
