"""Runs scheduled steps on the model in this process: builds the flat batch, runs it, samples."""

from __future__ import annotations

import torch

from services.model_shard.engine.request import SamplingParams
from services.model_shard.engine.sampler import sample
from services.model_shard.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from services.model_shard.model.llama import AttentionMetadata, DecodeBatch, LlamaForServing, PrefillSpan


def kv_cache_bytes_per_block(model: LlamaForServing, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return per_token * block_size


class LocalExecutor:
    def __init__(self, model: LlamaForServing, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        cfg = model.cfg
        self.kv_cache_bytes_per_block = kv_cache_bytes_per_block(model, block_size, model.embed_tokens.weight.dtype)
        dtype = model.embed_tokens.weight.dtype
        num_slots = num_blocks * block_size
        self.kv_caches = [
            (
                torch.zeros(cfg.num_kv_heads, num_slots, cfg.head_dim, dtype=dtype),
                torch.zeros(cfg.num_kv_heads, num_slots, cfg.head_dim, dtype=dtype),
            )
            for _ in range(cfg.num_layers)
        ]
        self._generators: dict[str, torch.Generator | None] = {}

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if request_id not in self._generators:
            gen = None
            if params.seed is not None and not params.greedy:
                gen = torch.Generator().manual_seed(params.seed)
                if params.skip_draws:
                    # A draw consumes the same generator state whatever the distribution, so
                    # replaying k uniform draws continues the sequence a stream started elsewhere.
                    uniform = torch.full((self.model.cfg.vocab_size,), 1.0)
                    for _ in range(params.skip_draws):
                        torch.multinomial(uniform, 1, generator=gen)
            self._generators[request_id] = gen
        return self._generators[request_id]

    def _slots(self, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare(self, out: SchedulerOutput):
        """Flat input ids, positions and attention metadata for one step."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        sample_index: list[int] = []
        decode_rows: list[tuple[int, int, list[int]]] = []  # (flat index, context length, blocks)
        prefills: list[PrefillSpan] = []
        for item in out.scheduled:
            seq, start = item.seq, len(input_ids)
            first = seq.num_computed_tokens
            end_pos = first + item.num_new_tokens
            input_ids.extend(seq.token_ids[first:end_pos])
            pos = torch.arange(first, end_pos)
            positions.append(pos)
            slots.append(self._slots(seq.block_ids, pos))
            if item.sample:
                sample_index.append(len(input_ids) - 1)
            if item.num_new_tokens == 1:
                decode_rows.append((start, end_pos, seq.block_ids))
            elif first == 0:
                prefills.append(PrefillSpan(start, len(input_ids), None, None))
            else:  # a continuation over cached context
                ctx = torch.arange(end_pos)
                mask = (ctx.unsqueeze(0) <= pos.unsqueeze(1)).unsqueeze(0)  # [1, q, C]
                prefills.append(PrefillSpan(start, len(input_ids), self._slots(seq.block_ids, ctx), mask))
        meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=prefills)
        if decode_rows:
            width = -(-max(n for _, n, _ in decode_rows) // self.block_size)
            tables = torch.tensor([b[:width] + [0] * (width - len(b[:width])) for _, _, b in decode_rows])
            lengths = torch.tensor([n for _, n, _ in decode_rows])
            mask = torch.arange(width * self.block_size).unsqueeze(0) < lengths.unsqueeze(1)
            meta.decode = DecodeBatch(torch.tensor([i for i, _, _ in decode_rows]), tables, mask)
        return torch.tensor(input_ids), torch.cat(positions), meta, torch.tensor(sample_index)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """One forward pass over every scheduled sequence; a token for each that samples, else None."""
        for request_id in out.finished_request_ids:
            self._generators.pop(request_id, None)
        if not out.scheduled:
            return ModelRunnerOutput([], [])
        input_ids, positions, meta, sample_index = self.prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling = [item.seq for item in out.scheduled if item.sample]
        if not sampling:
            return ModelRunnerOutput([None] * len(out.scheduled), [None] * len(out.scheduled))
        logits = self.model.compute_logits(hidden[sample_index])
        params = [s.params for s in sampling]
        generators = [self._generator(s.request_id, s.params) for s in sampling]
        histories = [s.token_ids for s in sampling] if any(p.repetition_penalty != 1.0 for p in params) else None
        tokens, logprobs = sample(logits, params, generators, histories)
        it_tokens, it_logprobs = iter(tokens), iter(logprobs)
        return ModelRunnerOutput([next(it_tokens) if item.sample else None for item in out.scheduled],
                                 [next(it_logprobs) if item.sample else None for item in out.scheduled])
