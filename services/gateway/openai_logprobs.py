"""OpenAI's logprobs objects from the gateway's token ids, log-probabilities and alternatives: chat's
`content` list, and completions' parallel lists (with echo, the prompt's tokens first)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from llmmesh.v1 import common_pb2

UNPICKABLE = -9999.0  # what OpenAI reports for a token the sampler could not pick (JSON has no -Infinity)


@dataclass
class Tokens:
    """Token ids with their log-probabilities and, where asked, their alternatives (TopLogprobs)."""

    ids: list[int]
    logprobs: list[float | None]
    top: list = field(default_factory=list)

    def rows(self) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        tops = [list(zip(t.token_ids, t.logprobs)) for t in self.top] or [[] for _ in self.ids]
        return list(zip(self.ids, self.logprobs, tops))

    def all_ids(self) -> list[int]:
        return [*self.ids, *(a for t in self.top for a in t.token_ids)]


@dataclass
class PromptPart:
    """Prompt logprobs as the gateway sends them: one entry per prompt token after the first."""

    ids: list[int]
    logprobs: list[float]
    top: list

    def as_tokens(self) -> Tokens:
        top = [common_pb2.TopLogprobs(), *self.top] if self.top else []
        return Tokens(list(self.ids), [None, *self.logprobs], top)


def _finite(logprob: float) -> float:
    return max(logprob, UNPICKABLE)


def chat_logprobs(tokens: Tokens, text_of: dict[int, str]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": text_of[token], "logprob": _finite(logprob), "bytes": list(text_of[token].encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top in tokens.rows()]}


def completion_logprobs(parts: list[Tokens], text_of: dict[int, str]) -> dict:
    """Alternatives are keyed by their text, as OpenAI's are (two ids with one text keep the first)."""
    rows = [row for part in parts for row in part.rows()]
    texts = [text_of[t] for t, _, _ in rows]
    want_top = any(p.top for p in parts)
    return {"tokens": texts, "token_logprobs": [None if lp is None else _finite(lp) for _, lp, _ in rows],
            "top_logprobs": [None if lp is None else _by_text(top, text_of) for _, lp, top in rows] if want_top else None,
            "text_offset": [0, *itertools.accumulate(len(t) for t in texts)][: len(texts)]}


def _by_text(top: list[tuple[int, float]], text_of: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, logprob in top:  # most likely first: it keeps a text two tokens share
        out.setdefault(text_of[token], _finite(logprob))
    return out
