"""Who goes first when the shard is busy: priority classes, then fair shares between tenants.

Policy "fair" (the default):

- Classes. A request's priority is a class: 0 (interactive) before 1 (standard) before 2 (batch),
  strictly. A waiting request rises one class every `aging_steps` engine steps it has waited, so a
  request of class c competes as class 0 after at most c * aging_steps steps: no class starves.
- Shares. Within a class, tenants share the shard by weight. Each tenant has a virtual time: the
  tokens computed for it (prompt chunks and decodes) divided by its weight. The waiting request of the
  tenant with the least virtual time goes first (start-time fair queuing over tokens); a tenant that
  becomes active starts at the least virtual time of the active ones, so idle time is not banked.
  Nothing is reserved: a tenant alone gets everything the shard has (work-conserving).
- Preemption. Under KV pressure the running sequence of the lowest class goes first, then the one of
  the tenant most over its share of running slots, then the latest admitted. When the batch is full (or
  KV is short) and the request next in line is of a higher class than a running one, or its tenant
  runs fewer than its weighted share of the slots while another tenant runs more, that running
  sequence is preempted for it (recomputed later) — at most `max_preemptions` per step.

Policy "fcfs": arrival order, and the newest admitted is preempted first (for comparison).

No torch and no gRPC here; the scheduler asks, this module answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from services.model_shard.engine.request import Sequence

POLICIES = ("fair", "fcfs")
MAX_TENANTS_TRACKED = 4096  # idle tenants' virtual times are dropped beyond this


@dataclass(frozen=True)
class FairnessConfig:
    policy: str = "fair"
    aging_steps: int = 2000  # a waiting request rises one class per this many steps
    max_preemptions: int = 2  # per step, to admit a request of a higher class or an under-served tenant

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.aging_steps < 1 or self.max_preemptions < 0:
            raise ValueError("aging_steps must be >= 1 and max_preemptions >= 0")


class FairShares:
    """Tenants' weights and virtual times, and the orderings the scheduler asks for."""

    def __init__(self, config: FairnessConfig):
        self.config = config
        self.fair = config.policy == "fair"
        self.step = 0
        self.vtime: dict[str, float] = {}
        self.weight: dict[str, float] = {}
        self.active: Counter[str] = Counter()  # sequences of each tenant, waiting or running
        self.tokens: Counter[str] = Counter()  # tokens computed for each tenant (metrics)
        self.preemptions: Counter[str] = Counter()

    # --- membership and accounting ---

    def join(self, seq: Sequence) -> None:
        t = seq.tenant
        self.weight[t] = seq.weight
        if not self.active[t]:
            floor = min((self.vtime.get(u, 0.0) for u, n in self.active.items() if n), default=None)
            self.vtime[t] = max(self.vtime.get(t, 0.0), floor if floor is not None else 0.0)
        self.active[t] += 1
        seq.enqueued_step = self.step
        if len(self.vtime) > MAX_TENANTS_TRACKED:
            for u in [u for u in self.vtime if not self.active[u]]:
                del self.vtime[u]
                self.weight.pop(u, None)

    def leave(self, seq: Sequence) -> None:
        self.active[seq.tenant] -= 1
        if self.active[seq.tenant] <= 0:
            del self.active[seq.tenant]

    def charge(self, seq: Sequence, tokens: int) -> None:
        self.vtime[seq.tenant] = self.vtime.get(seq.tenant, 0.0) + tokens / self.weight.get(seq.tenant, 1.0)
        self.tokens[seq.tenant] += tokens

    def requeued(self, seq: Sequence) -> None:
        """seq went back to the waiting queue (preempted): its wait starts again."""
        seq.enqueued_step = self.step
        self.preemptions[seq.tenant] += 1

    # --- orderings ---

    def class_of(self, seq: Sequence) -> int:
        """The class seq competes in while it waits (aging lifts it)."""
        return max(0, seq.priority - (self.step - seq.enqueued_step) // self.config.aging_steps)

    def next_to_admit(self, waiting: Iterable[Sequence], running: list[Sequence],
                      skip: set[int] = frozenset()) -> Sequence | None:
        """The waiting sequence to admit next (ids in `skip` are passed over). Between equal virtual
        times (a tenant that just became active starts at the backlogged one's), the tenant with
        fewer running sequences per weight goes first."""
        best, best_key, load = None, None, None
        for order, seq in enumerate(waiting):
            if id(seq) in skip:
                continue
            if not self.fair:
                return seq
            load = load if load is not None else self._running_per_weight(running)
            key = (self.class_of(seq), self.vtime.get(seq.tenant, 0.0), load.get(seq.tenant, 0.0), order)
            if best_key is None or key < best_key:
                best, best_key = seq, key
        return best

    def running_order_key(self, seq: Sequence):
        """Sort key of the running batch: decodes before prompt chunks, then (fair) class and share."""
        prefill = seq.num_tokens - seq.num_computed_tokens > 1
        return (prefill, seq.priority, self.vtime.get(seq.tenant, 0.0)) if self.fair else prefill

    def victim(self, candidates: list[Sequence], running: list[Sequence]) -> Sequence:
        """Which of candidates (a tail of the running batch, in its order) to preempt."""
        if not self.fair:
            return candidates[-1]
        load = self._running_per_weight(running)
        return max(enumerate(candidates), key=lambda item: (item[1].priority, load[item[1].tenant], item[0]))[1]

    def may_preempt_for(self, seq: Sequence, victim: Sequence, running: list[Sequence], slots: int) -> bool:
        """Whether waiting seq deserves victim's place: a higher class, or (same class) its tenant is
        under its weighted share of the slots and the victim's tenant is over its own."""
        if not self.fair:
            return False
        wanted = self.class_of(seq)
        if victim.priority != wanted:
            return victim.priority > wanted
        if victim.tenant == seq.tenant:
            return False
        counts = Counter(s.tenant for s in running)
        total = sum(self.weight.get(t, 1.0) for t in self.active)
        share = {t: slots * self.weight.get(t, 1.0) / total for t in (seq.tenant, victim.tenant)}
        return counts[seq.tenant] + 1 <= share[seq.tenant] and counts[victim.tenant] > share[victim.tenant]

    def _running_per_weight(self, running: list[Sequence]) -> dict[str, float]:
        counts = Counter(s.tenant for s in running)
        return {t: n / self.weight.get(t, 1.0) for t, n in counts.items()}
