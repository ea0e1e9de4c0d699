"""A model shard whose engine thread dies on a marked request: `python -m tests.faulty_shard` takes
the shard's arguments. A request with max_tokens == POISON_MAX_TOKENS makes the scheduler raise,
outside any step's guard, as a bug in the engine's own bookkeeping would."""

from __future__ import annotations

from services.model_shard.__main__ import main
from services.model_shard.engine.scheduler import Scheduler

POISON_MAX_TOKENS = 77

_schedule = Scheduler.schedule


def _schedule_or_die(self):
    if any(seq.params.max_tokens == POISON_MAX_TOKENS for seq in self.waiting):
        raise RuntimeError("injected: the scheduler's state is broken")
    return _schedule(self)


Scheduler.schedule = _schedule_or_die

if __name__ == "__main__":
    main()
