"""Per-request sampling over a batch of logits: pure functions, no host sync until the ids."""

from __future__ import annotations

import torch

from services.model_shard.engine.request import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, histories: list[list[int]], penalties: list[float]) -> None:
    """In place, CTRL-style: seen tokens' positive logits are divided, negative multiplied."""
    for row, (history, penalty) in enumerate(zip(histories, penalties)):
        if penalty == 1.0 or not history:
            continue
        ids = torch.tensor(sorted(set(history)), dtype=torch.long)
        seen = logits[row, ids]
        logits[row, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; top_k [B] (0 = off); top_p [B] (1 = off). Masked entries become -inf."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[list[int]] | None = None,
) -> tuple[list[int], list[float | None]]:
    """logits: float32 [B, V], one row per request. Returns one token id per row, and its
    log-probability under the model's raw distribution for rows that asked (else None)."""
    raw = logits
    if histories is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = logits.clone()
        apply_repetition_penalty(logits, histories, [p.repetition_penalty for p in params])
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        temps = torch.tensor([params[i].temperature for i in random_rows]).unsqueeze(1)
        top_k = torch.tensor([params[i].top_k for i in random_rows])
        top_p = torch.tensor([params[i].top_p for i in random_rows])
        probs = filter_top_k_top_p(logits[rows] / temps, top_k, top_p).softmax(dim=-1)
        for j, i in enumerate(random_rows):
            # One draw per request from its own generator: a seeded request gets the same
            # tokens whatever else shares the batch.
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    logprobs: list[float | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        rows = torch.tensor(wanted)
        chosen = raw[rows].log_softmax(dim=-1).gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
        for i, lp in zip(wanted, chosen):
            logprobs[i] = lp
    return tokens.tolist(), logprobs
