"""Constrained decoding: a request's structured-output spec becomes a grammar (llguidance), a matcher
per sequence follows the tokens it accepts, and at each step a constrained row gets the bitmask of the
tokens its grammar allows next, which the sampler applies to its logits. Rows without a grammar pay
nothing.

Specs (`OutputSpec.kind`): json_schema (a JSON Schema as text), json_object (any JSON object), regex
(the whole answer full-matches it), lark (llguidance's Lark dialect), gbnf (llama.cpp's GBNF, turned
into Lark), choice (exactly one of a JSON list of strings).

The grammar engine is llguidance: one small wheel with no dependencies, matchers built in about a
millisecond, masks computed lazily with its own per-step work bounds (LLParserLimits), so a
pathological grammar fails its request instead of stalling the batch. Such a failure is the request's
fault, not the server's: it ends as a RequestFault naming the limit (INVALID_ARGUMENT, HTTP 400).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from services.model_shard.engine.request import RequestFault

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf", "choice")
GRAMMAR_CACHE_SIZE = 256  # compiled grammar texts kept, least recently used first out
MASK_BITS = 32  # tokens per bitmask word: token t is bit t % 32 of word t // 32
# llguidance's resource limits (LLParserLimits), by the words of the errors that reach them: what the
# client's grammar asked too much of, said in terms a client can act on.
LIMITS = (
    (re.compile(r"Current row has \d+ items; max is \d+"),
     "max_items_in_row: more alternatives live at one point than the parser follows (e.g. a choice or "
     "alternation of that many options sharing a prefix)"),
    (re.compile(r"Too many items \(limit", re.I), "step_max_items: parser items one step may make"),
    (re.compile(r"fuel", re.I), "lexer fuel: the work one step of the grammar's lexer may do"),
    (re.compile(r"too many states", re.I), "max_lexer_states: lexer states a grammar may build"),
    (re.compile(r"too many expressions constructed", re.I), "lexer expressions: regular expressions the lexer "
     "may build for a grammar's tokens (e.g. very many string alternatives)"),
    (re.compile(r"grammar size \(number of symbols\) too big|initial lexer configuration \(grammar\) too big", re.I),
     "max_grammar_size: symbols in the grammar"),
)


def limit_reached(error: str) -> str | None:
    """Which of the grammar engine's limits `error` says was reached (None: no limit, another failure)."""
    return next((what for pattern, what in LIMITS if pattern.search(error)), None)


def grammar_failure(exc: Exception) -> str:
    """Why a constrained sequence cannot go on, as its RequestOutput.error: a RequestFault (the
    client's grammar reached a limit, named in the message) or a plain str (the server's fault)."""
    error = str(exc)
    limit = limit_reached(error)
    if limit is None:
        return f"constrained decoding failed: {error}"
    first_line = error.strip().splitlines()[0] if error.strip() else error  # not the parser state dump below it
    return RequestFault(f"the structured output's grammar reached a limit of the grammar engine ({limit}): "
                        f"{first_line}")


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    value: str  # the schema, regex or grammar text; for choice, a JSON list of strings

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def _llguidance():
    import llguidance  # imported on first use: a shard that never constrains does not load it

    return llguidance


class Grammars:
    """Grammars of one tokenizer: spec -> grammar text (cached), and matchers for sequences."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        ll = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = ll.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._cache: OrderedDict[OutputSpec, str] = OrderedDict()
        self._lock = threading.Lock()  # grammars are made on worker threads (the shard's servicer)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]) -> "Grammars":
        return cls((Path(model_dir) / "tokenizer.json").read_text(), vocab_size, eos_token_ids)

    def grammar(self, spec: OutputSpec) -> str:
        """The spec's grammar text; ValueError saying what is wrong with the spec."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        text = _grammar_text(spec)
        error = _llguidance().LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise ValueError(f"{spec.kind}: {error.strip()}")
        with self._lock:
            self._cache[spec] = text
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return text

    def matcher(self, spec: OutputSpec, prefix: list[int] = ()):
        """A matcher at the start of the answer, advanced over `prefix` (tokens already delivered
        elsewhere, for a resumed stream); ValueError if the spec or the prefix does not fit."""
        ll = _llguidance()
        matcher = ll.LLMatcher(self.tokenizer, self.grammar(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"{spec.kind}: {matcher.get_error().strip()}")
        if prefix and not matcher.consume_tokens(list(prefix)):
            raise ValueError(f"the tokens already delivered do not match the {spec.kind}: {matcher.get_error()}")
        return matcher


def _grammar_text(spec: OutputSpec) -> str:
    ll = _llguidance()
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON object (a schema)")
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if spec.kind == "json_object":
        return ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
    if spec.kind == "regex":
        return ll.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return ll.LLMatcher.grammar_from_lark(spec.value)
    if spec.kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(spec.value)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain Exceptions, with a message that says where
            raise ValueError(f"gbnf: {exc}") from None
        return ll.LLMatcher.grammar_from_lark(lark)
    options = json.loads(spec.value)
    if not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError("choice needs a non-empty list of non-empty strings")
    return ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """In place: the logits of rows `rows` outside their bitmask ([R, vocab / 32] int32) to -inf."""
    from services.model_shard.model import native

    if native.available() and logits.dtype == torch.float32 and logits.is_contiguous():
        native.apply_token_bitmask(logits, rows.to(torch.int64), masks.contiguous())
        return
    shifts = torch.arange(MASK_BITS, dtype=torch.int32)
    allowed = ((masks.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


class Matchers:
    """The matchers of an engine's constrained sequences: the scheduler's Constraints."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._by_seq: dict[int, object] = {}
        self._executor = None  # llguidance's thread pool, made on first use

    def add(self, seq, matcher) -> None:
        self._by_seq[id(seq)] = matcher

    def masks(self, seqs: list) -> list[torch.Tensor]:
        """The next-token bitmasks of constrained sequences, computed in parallel (llguidance's threads,
        outside the GIL: the model is idle while they run)."""
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        matchers = [(self._by_seq[id(seq)], i) for i, seq in enumerate(seqs)]
        words = -(-self.vocab_size // MASK_BITS)
        out = torch.zeros(len(seqs), words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(matchers, out.data_ptr(), words * 4, len(seqs))  # out is contiguous
        return list(out)

    def valid_prefix(self, seq, draft: list[int]) -> int:
        """How many leading tokens of a proposal seq's grammar allows (the rest could never be accepted)."""
        matcher = self._by_seq.get(id(seq))
        return len(draft) if matcher is None else matcher.validate_tokens(draft)

    def draft_masks(self, seq, draft: list[int]) -> list[torch.Tensor]:
        """The bitmasks of a drafted sequence's checked positions: position j's after its first j
        proposals (valid_prefix has cut the draft to tokens the grammar allows). The matcher is rolled
        back after: only accepted tokens advance it (advance)."""
        matcher = self._by_seq[id(seq)]
        words = -(-self.vocab_size // MASK_BITS)
        masks = []
        for j in range(len(draft) + 1):
            bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
            masks.append(bits[:words].clone())
            if j < len(draft) and not matcher.consume_token(draft[j]):
                raise ValueError(matcher.get_error() or f"proposed token {draft[j]} does not fit the grammar")
        matcher.rollback(len(draft))
        return masks

    def advance(self, seq, token: int) -> bool:
        matcher = self._by_seq.get(id(seq))
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            raise ValueError(matcher.get_error() or f"token {token} does not fit the grammar")
        return matcher.is_stopped()

    def release(self, seq) -> None:
        self._by_seq.pop(id(seq), None)
