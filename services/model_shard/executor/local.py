"""Runs scheduled steps on the model in this process: builds the flat batch, runs it, samples."""

from __future__ import annotations

import copy

import torch

from services.model_shard.engine.sampler import SamplingBatch, sample, token_logprobs
from services.model_shard.engine.request import Sequence
from services.model_shard.model.kv_format import new_kv_cache, row_bytes
from services.model_shard.engine.scheduler import ModelRunnerOutput, PromptLogprobs, ScheduledSeq, SchedulerOutput
from services.model_shard.model.llama import (AttentionMetadata, DecodeBatch, LlamaConfig, LlamaForServing, PrefillSpan,
                                              slots_of, stage_layers)


def kv_cache_bytes_per_block(cfg: LlamaConfig, block_size: int, dtype: torch.dtype, tensor_parallel: int = 1,
                             pipeline_parallel: int = 1, kv_cache_dtype: str = "auto") -> int:
    """KV bytes one block costs a worker: its KV heads, in the largest pipeline stage's layers, stored
    as kv_cache_dtype (kv_format.py)."""
    first, last = stage_layers(cfg.num_layers, pipeline_parallel, 0)  # stage 0 is never smaller
    per_token = 2 * (last - first) * (cfg.num_kv_heads // tensor_parallel) * row_bytes(cfg.head_dim, dtype, kv_cache_dtype)
    return per_token * block_size


PROMPT_LOGITS_ROWS = 128  # prompt positions turned into logits at once (each row is vocab floats)


class LocalExecutor:
    """Runs steps on a model (or a worker's partition of one) in this process."""

    def __init__(self, model: LlamaForServing, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        """kv_cache_dtype: "auto" (the model's dtype) or "int8" (kv_format.py)."""
        self.model = model
        self.block_size = block_size
        cfg, dtype = model.cfg, model.dtype
        num_slots = num_blocks * block_size
        self.kv_caches = [new_kv_cache(model.num_kv_heads, num_slots, cfg.head_dim, dtype, kv_cache_dtype)
                          for _ in model.layers]
        k0 = self.kv_caches[0][0]
        self.kv_cache_bytes_per_block = 2 * len(self.kv_caches) * k0[:, :block_size].numel() * k0.element_size()
    def _block_slots(self, block_ids: list[int]) -> torch.Tensor:
        offsets = torch.arange(self.block_size)
        return (torch.tensor(block_ids, dtype=torch.long).unsqueeze(1) * self.block_size + offsets).flatten()

    @torch.inference_mode()
    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the blocks' K and V for every layer: uint8 [n, kv_cache_bytes_per_block], each row
        laid out [layer, k/v, kv_head, offset, cached row] (see kv_layout; an int8 row ends in its scale)."""
        slots = self._block_slots(block_ids)
        n, (kvh, _, d) = len(block_ids), self.kv_caches[0][0].shape
        per_layer = [torch.stack([k.index_select(1, slots), v.index_select(1, slots)]) for k, v in self.kv_caches]
        data = torch.stack(per_layer).view(len(per_layer), 2, kvh, n, self.block_size, d)
        return data.permute(3, 0, 1, 2, 4, 5).contiguous().view(n, -1).view(torch.uint8)

    @torch.inference_mode()
    def import_blocks(self, block_ids: list[int], values: list[bytes]) -> None:
        """Write blocks exported by export_blocks (here or on another shard of the same layout);
        LLMEngine.import_blocks has checked their size."""
        k0 = self.kv_caches[0][0]
        (kvh, _, d), n = k0.shape, len(block_ids)
        data = torch.frombuffer(bytearray(b"".join(values)), dtype=torch.uint8).view(k0.dtype)
        data = data.view(n, len(self.kv_caches), 2, kvh, self.block_size, d).permute(1, 2, 3, 0, 4, 5)
        slots = self._block_slots(block_ids)
        for (k, v), layer in zip(self.kv_caches, data):
            k.index_copy_(1, slots, layer[0].reshape(kvh, n * self.block_size, d))
            v.index_copy_(1, slots, layer[1].reshape(kvh, n * self.block_size, d))

    def _slots(self, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        return slots_of(torch.tensor(block_ids, dtype=torch.long), positions, self.block_size)

    def prepare(self, scheduled: list[ScheduledSeq]):
        """Flat input ids, positions and attention metadata for one step (or a micro-batch of one)."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        sample_index: list[int] = []
        decode_rows: list[tuple[int, int, list[int]]] = []  # (flat index, context length, blocks)
        prefills: list[PrefillSpan] = []
        for item in scheduled:
            seq, start = item.seq, len(input_ids)
            first = seq.num_computed_tokens
            end_pos = first + item.num_new_tokens
            input_ids.extend(seq.token_ids[first:end_pos] if not item.draft else seq.token_ids[first:] + item.draft)
            pos = torch.arange(first, end_pos)
            positions.append(pos)
            slots.append(self._slots(seq.block_ids, pos))
            if item.draft:  # every checked position samples
                sample_index.extend(range(start, len(input_ids)))
            elif item.sample:
                sample_index.append(len(input_ids) - 1)
            if item.num_new_tokens == 1:
                decode_rows.append((start, end_pos, seq.block_ids))
            else:  # a whole prompt, or a continuation over cached context
                prefills.append(PrefillSpan(start, len(input_ids), first, seq.block_ids, self.block_size))
        meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=prefills)
        if decode_rows:
            index, lengths, tables = zip(*decode_rows)
            meta.decode = DecodeBatch.build(list(index), list(tables), list(lengths), self.block_size)
        return torch.tensor(input_ids), torch.cat(positions), meta, torch.tensor(sample_index)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """One forward pass over every scheduled sequence; a token for each that samples, else None."""
        if not out.scheduled:
            return ModelRunnerOutput([], [])
        input_ids, positions, meta, sample_index = self.prepare(out.scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.sample(out.scheduled, hidden, sample_index)

    def sample(self, scheduled: list[ScheduledSeq], hidden: torch.Tensor, sample_index: torch.Tensor) -> ModelRunnerOutput:
        """Tokens from the final hidden states of a step's (or micro-batch's) sequences."""
        sampling = [row for item in scheduled if item.sample for row in sampled_rows(item)]
        prompt = self.prompt_logprobs(scheduled, hidden)
        if not sampling:
            return ModelRunnerOutput([None] * len(scheduled), [None] * len(scheduled), prompt_logprobs=prompt)
        logits = self.model.compute_logits(hidden[sample_index])
        masks = [mask for item in scheduled if item.sample for mask in position_masks(item)]
        result = sample(logits, SamplingBatch.from_sequences(sampling, masks))
        index, row = [], 0  # each item's rows: an int, a slice for a drafted one, None where none
        for item in scheduled:
            n = 1 + len(item.draft) if item.sample else 0
            index.append(None if not n else row if not item.draft else slice(row, row + n))
            row += n

        def aligned(values):
            return None if values is None else [None if i is None else values[i] for i in index]

        # A drafted item fails with its first position that could not be sampled.
        errors = [next(filter(None, e), None) if isinstance(e, list) else e for e in aligned(result.failed)]
        return ModelRunnerOutput(aligned(result.tokens), aligned(result.logprobs), errors,
                                 aligned(result.top_logprobs), prompt)

    def prompt_logprobs(self, scheduled: list[ScheduledSeq], hidden: torch.Tensor) -> list[PromptLogprobs | None] | None:
        """For the sequences that asked, the log-probability of each prompt token this step's hidden
        states predict (position p predicts token p+1), from the model's own logits."""
        out: list[PromptLogprobs | None] = [None] * len(scheduled)
        offset = 0  # of the item's first row in hidden
        for i, item in enumerate(scheduled):
            seq, first = item.seq, item.seq.num_computed_tokens
            end = min(first + item.num_new_tokens, len(seq.prompt_token_ids) - 1)  # the last predicts an output
            if seq.params.prompt_logprobs and end > first:
                values, tops = [], []
                for lo in range(first, end, PROMPT_LOGITS_ROWS):  # bounded: [rows, vocab] float32 at a time
                    hi = min(lo + PROMPT_LOGITS_ROWS, end)
                    logits = self.model.compute_logits(hidden[offset + lo - first: offset + hi - first])
                    chosen, top = token_logprobs(logits, torch.tensor(seq.token_ids[lo + 1: hi + 1]),
                                                 [seq.params.top_logprobs] * (hi - lo))
                    values += chosen
                    tops += top or []
                out[i] = PromptLogprobs(first, values, tops if seq.params.top_logprobs else None)
            offset += item.num_new_tokens
        return out if any(p is not None for p in out) else None


def position_masks(item: ScheduledSeq) -> list:
    """The grammar masks of the rows item samples: a drafted constrained item has one per position."""
    if isinstance(item.token_mask, list):
        return item.token_mask
    return [item.token_mask] * (1 + len(item.draft))


def sampled_rows(item: ScheduledSeq) -> list[Sequence]:
    """The sequences a scheduled item samples as: itself, or for a drafted one (speculative.py) one
    row per checked position, each as the sequence would be with the proposals before it accepted,
    so that penalties, min_tokens and seeded draws see exactly the history they would see without
    speculation."""
    if not item.draft:
        return [item.seq]
    rows = [item.seq]
    for j in range(1, len(item.draft) + 1):
        row = copy.copy(item.seq)
        row.token_ids = item.seq.token_ids + item.draft[:j]
        row.output_token_ids = item.seq.output_token_ids + item.draft[:j]
        rows.append(row)
    return rows
