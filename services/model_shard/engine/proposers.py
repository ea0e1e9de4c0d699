"""Where speculative proposals come from, with no second model: the request's own context, and the
answers given before in the request's scope.

- NgramIndex: prompt lookup (vLLM's `ngram`, llama.cpp's lookup). The tokens that followed the
  latest earlier occurrence of the longest n-gram ending the context (its prompt and what it made).
- AnswerStore: suffix decoding over earlier answers (Arctic Inference's, vLLM's `suffix`). Recent
  answers, each with the end of its prompt, indexed by their n-grams, so a question answered before
  proposes its answer. Bounded in tokens and evicted least recently used; keyed by scope, so no
  answer is proposed outside the scope it was given in (a tenant's own unless the operator shares
  the response cache).

A proposal is only a guess: the model checks every proposed token (speculative.py), so a wrong one
costs a position of compute, never a different answer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class NgramIndex:
    """Where each n-gram of one sequence's tokens last occurred, grown as the tokens grow: a proposal
    costs a dictionary lookup per n, not a scan of the context."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)
        self.follower: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are in the maps

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram ending tokens."""
        return self.match(tokens, k)[1]

    def match(self, tokens: list[int], k: int) -> tuple[int, list[int]]:
        """(n, proposal): the longest n-gram ending tokens that occurred before, and up to k tokens
        that followed it; (0, []) when none did."""
        length = len(tokens)
        for end in range(max(self.indexed, 1), length):  # n-grams with a follower: they end before the last token
            for n, follower in self.follower.items():
                if end >= n:
                    follower[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, length)
        for n in self.sizes:
            if length >= n:
                start = self.follower[n].get(tuple(tokens[length - n :]))
                if start is not None:
                    return n, tokens[start : start + k]
        return 0, []


@dataclass
class _Answer:
    scope: bytes
    tokens: list[int]  # the end of its prompt, then the answer
    content: int  # hash of (scope, tokens): the same answer given again is one entry
    keys: list[tuple[int, int]] = field(default_factory=list)  # (n, key) entries it wrote in the index


class AnswerStore:
    """Earlier answers by scope, for suffix proposals: at most max_tokens tokens in all, the least
    recently given or used evicted first. An answer is indexed by the n-grams (n in `sizes`) that a
    token of its answer follows, the last of its prompt's tokens included, so a context ending the
    way a stored prompt did proposes that prompt's answer. Keys are hashes of (scope, n-gram): a rare
    collision only makes a proposal the model rejects."""

    def __init__(self, max_tokens: int = 200_000, sizes: tuple[int, ...] = (32, 16, 8), prompt_tail: int = 32):
        if max_tokens < 0:
            raise ValueError(f"the answer store's size must be >= 0 tokens, got {max_tokens}")
        self.max_tokens = max_tokens
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.prompt_tail = prompt_tail
        self.num_tokens = 0
        self._answers: OrderedDict[int, _Answer] = OrderedDict()  # id -> answer, least recently used first
        self._by_content: dict[int, int] = {}  # hash of (scope, tokens) -> id: an answer given again is touched
        self._index: dict[int, dict[int, tuple[int, int]]] = {n: {} for n in self.sizes}  # n -> key -> (id, end)
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, scope: bytes, prompt: list[int], answer: list[int]) -> None:
        """Remember an answer given in scope to a prompt."""
        tail = list(prompt[-self.prompt_tail :])
        tokens = tail + list(answer)
        if not answer or len(tokens) > self.max_tokens:
            return
        content = hash((scope, tuple(tokens)))
        if (known := self._by_content.get(content)) is not None and known in self._answers:
            self._answers.move_to_end(known)
            return
        aid, self._next_id = self._next_id, self._next_id + 1
        entry = _Answer(scope, tokens, content)
        for end in range(len(tail), len(tokens)):  # n-grams followed by a token of the answer
            for n in self.sizes:
                if end >= n:
                    key = hash((scope, tuple(tokens[end - n : end])))
                    self._index[n][key] = (aid, end)
                    entry.keys.append((n, key))
        self._answers[aid] = entry
        self._by_content[content] = aid
        self.num_tokens += len(tokens)
        while self.num_tokens > self.max_tokens:
            self._evict()

    def match(self, scope: bytes, context: list[int], k: int) -> tuple[int, list[int]]:
        """(n, proposal): the longest n-gram ending context that a stored answer of scope continued,
        and up to k tokens of what followed; (0, []) when none did."""
        for n in self.sizes:
            if len(context) < n:
                continue
            hit = self._index[n].get(hash((scope, tuple(context[-n:]))))
            if hit is None:
                continue
            aid, end = hit
            entry = self._answers[aid]
            if entry.scope != scope or entry.tokens[end - n : end] != context[-n:]:
                continue  # a hash collision
            self._answers.move_to_end(aid)
            return n, entry.tokens[end : end + k]
        return 0, []

    def _evict(self) -> None:
        aid, entry = self._answers.popitem(last=False)
        self.num_tokens -= len(entry.tokens)
        for n, key in entry.keys:
            if self._index[n].get(key, (None,))[0] == aid:
                del self._index[n][key]
        if self._by_content.get(entry.content) == aid:
            del self._by_content[entry.content]
