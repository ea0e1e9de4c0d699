"""The paged attention's inputs (which tokens, which cached keys) and its torch reference kernel.

The KV cache of a layer is a pair of tensors `[num_kv_heads, num_slots, head_dim]`, a slot being
`block_id * block_size + offset`: tokens are written by slot, and decode reads whole blocks
through each sequence's block table (a block is a contiguous run of slots).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeBatch:
    """Sequences that add exactly one token this step, attended in one padded call."""

    token_index: torch.Tensor  # [B] positions of their tokens in the flat batch
    block_tables: torch.Tensor  # [B, N] blocks holding each context, padded with block 0
    context_lens: torch.Tensor  # [B] keys each sequence attends to (its new token's included)
    block_size: int

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """float32 [B, N * block_size]: 0 where the key is real context, -inf past it (the torch path's mask)."""
        return self.windowed_bias(None)

    def windowed_bias(self, window: int | None) -> torch.Tensor:
        """bias, also -inf before the last `window` keys of each context (a sliding-window layer)."""
        keys = torch.arange(self.block_tables.shape[1] * self.block_size).unsqueeze(0)
        lens = self.context_lens.unsqueeze(1)
        outside = keys >= lens if window is None else (keys >= lens) | (keys < lens - window)
        return torch.zeros(keys.shape[1]).masked_fill(outside, float("-inf"))

    @classmethod
    def build(cls, token_index: list[int], block_tables: list[list[int]], lengths: list[int],
              block_size: int) -> "DecodeBatch":
        """block_tables: each sequence's blocks, at least enough for its context length."""
        width = -(-max(lengths) // block_size)
        tables = torch.tensor([b[:width] + [0] * (width - len(b[:width])) for b in block_tables])
        return cls(torch.tensor(token_index), tables, torch.tensor(lengths), block_size)


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slots of a sequence's positions, given its blocks."""
    return block_table[positions // block_size] * block_size + positions % block_size


@dataclass
class PrefillSpan:
    """A sequence that adds several tokens: a whole prompt, or a chunk that continues a context whose
    earlier keys are in the cache (a later chunk, or a prompt after reused prefix blocks)."""

    start: int  # its tokens are flat[start:end]
    end: int
    context_start: int = 0  # the position of its first token; 0: the span is the whole context
    block_table: list[int] | None = None  # the sequence's blocks (needed with context_start > 0)
    block_size: int = 0

    @functools.cached_property
    def kv_slots(self) -> torch.Tensor:
        """[C] the slots of the whole context, cached keys and the span's own (torch path)."""
        positions = torch.arange(self.context_start + self.end - self.start)
        return slots_of(torch.tensor(self.block_table), positions, self.block_size)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[1, end - start, C]: each token sees the context up to itself (torch path)."""
        return self.mask_within(None)

    def mask_within(self, window: int | None) -> torch.Tensor:
        """mask, and within the last `window` keys up to itself (a sliding-window layer)."""
        positions = torch.arange(self.context_start, self.context_start + self.end - self.start).unsqueeze(1)
        keys = torch.arange(self.context_start + self.end - self.start).unsqueeze(0)
        seen = keys <= positions
        if window is not None:
            seen &= keys > positions - window
        return seen.unsqueeze(0)

    @functools.cached_property
    def paged(self) -> DecodeBatch:
        """The span's tokens as rows of paged decode attention, each over the context up to itself:
        the native kernel reads the cached keys where they lie instead of a gathered copy."""
        n = self.end - self.start
        lengths = torch.arange(self.context_start + 1, self.context_start + n + 1)
        width = -(-(self.context_start + n) // self.block_size)
        table = torch.tensor(self.block_table[:width]).expand(n, width)
        return DecodeBatch(torch.arange(self.start, self.end), table, lengths, self.block_size)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: DecodeBatch | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)



def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence. q [B, H, D]; k, v [KVH, B, L, D]; bias [B, L] float32 (0 for real
    context, -inf past it). scale: of the scores (None: D ** -0.5); softcap: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma 2). Returns [B, H, D].

    Two batched matmuls with the query heads grouped under their KV head. CPU SDPA's flash kernel
    spends milliseconds per call on this shape (one query row, a mask); this is ~20x faster.
    """
    B, H, D = q.shape
    kvh = k.shape[0]
    qg = q.view(B, kvh, H // kvh, D).transpose(0, 1)  # [KVH, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # [KVH, B, G, L]
    scale = D**-0.5 if scale is None else scale
    if softcap is None:
        scores = torch.add(bias.view(1, B, 1, -1), scores, alpha=scale)  # scale and mask in one op
    else:
        scores = torch.tanh(scores * (scale / softcap)) * softcap + bias.view(1, B, 1, -1)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [KVH, B, G, D]
    return out.transpose(0, 1).reshape(B, H, D)
