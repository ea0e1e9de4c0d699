"""llguidance against xgrammar on this machine, for the JSON Schemas of tests/json_schemas.py and this
model's tokenizer: compile time, mask time per step, and whether each accepts what the other generates.

Per schema and backend: the time to a matcher's first mask from the schema (compile; no cache), then a
seeded random walk of up to --steps tokens through that backend's masks, timing each mask. Every walk
that completes is handed to the other backend (does it accept the same tokens?) and to `jsonschema`
(does the text validate?). xgrammar is not a dependency of the mesh: install it beside it to compare
(`pip install xgrammar==0.2.8`); without it, only llguidance's rows print.

    .venv/bin/python bench/grammar_backends.py [--steps 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsonschema  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from tests.json_schemas import SCHEMAS  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
EOS = 2  # <|im_end|>


def allowed_tokens(mask_words: torch.Tensor, vocab: int) -> list[int]:
    bits = ((mask_words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int):
        import llguidance

        self.ll, self.vocab = llguidance, vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=[EOS])

    def matcher(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)

    def mask(self, m) -> torch.Tensor:
        out = torch.zeros(-(-self.vocab // 32), dtype=torch.int32)
        m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)
        return out

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int):
        import xgrammar

        self.xgr, self.vocab = xgrammar, vocab
        by_id = sorted(json.loads(tokenizer_json)["model"]["vocab"].items(), key=lambda kv: kv[1])
        info = xgrammar.TokenizerInfo([t for t, _ in by_id], xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                      stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def matcher(self, schema):
        # The same compact JSON as llguidance's whitespace_flexible=False, so each can check the other's walks.
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m) -> torch.Tensor:
        out = self.xgr.allocate_token_bitmask(1, self.vocab)
        m.fill_next_token_bitmask(out)
        return out[0]

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_terminated()


def walk(backend, schema, steps: int, rng: random.Random) -> tuple[float, list[float], list[int] | None]:
    """(compile ms, mask ms per step, the tokens of a completed walk or None)."""
    start = time.perf_counter()
    m = backend.matcher(schema)
    first = backend.mask(m)
    compile_ms = (time.perf_counter() - start) * 1000
    mask_ms, tokens, mask = [], [], first
    for _ in range(steps):
        options = allowed_tokens(mask, backend.vocab)
        # Leave as soon as the grammar allows (short walks), else any allowed token.
        token = EOS if EOS in options and rng.random() < 0.5 else rng.choice(options)
        if not backend.accept(m, token):
            raise AssertionError(f"{backend.name} refused a token its own mask allowed")
        if token == EOS:
            return compile_ms, mask_ms, tokens
        tokens.append(token)
        if backend.done(m):  # llguidance stops once only EOS may follow
            return compile_ms, mask_ms, tokens
        start = time.perf_counter()
        mask = backend.mask(m)
        mask_ms.append((time.perf_counter() - start) * 1000)
    return compile_ms, mask_ms, None


def accepts(backend, schema, tokens: list[int]) -> bool:
    m = backend.matcher(schema)
    return all(backend.accept(m, t) for t in tokens) and backend.accept(m, EOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer_json = (MODEL / "tokenizer.json").read_text()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    backends = [LLGuidance(tokenizer_json, vocab)]
    try:
        backends.append(XGrammar(tokenizer_json, vocab))
    except ImportError:
        print("xgrammar is not installed: llguidance only")
    rows = {}
    for backend in backends:
        others = [b for b in backends if b is not backend]
        compiles, masks, completed, valid, cross = [], [], 0, 0, 0
        for i, schema in enumerate(SCHEMAS):
            compile_ms, mask_ms, tokens = walk(backend, schema, args.steps, random.Random(args.seed + i))
            compiles.append(compile_ms)
            masks.extend(mask_ms)
            if tokens is None:
                continue
            completed += 1
            try:
                jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
            cross += all(accepts(other, schema, tokens) for other in others)
        rows[backend.name] = {
            "compile_ms_p50": statistics.median(compiles), "compile_ms_max": max(compiles),
            "mask_ms_p50": statistics.median(masks), "mask_ms_p99": sorted(masks)[int(0.99 * (len(masks) - 1))],
            "walks_completed": completed, "valid": valid, "accepted_by_other": cross if others else None}
    print(f"{len(SCHEMAS)} schemas, random walks of up to {args.steps} tokens, {torch.get_num_threads()} threads\n")
    print("| backend | compile p50 | compile max | mask p50 | mask p99 | walks done | jsonschema-valid | other accepts |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['compile_ms_p50']:.1f} ms | {r['compile_ms_max']:.1f} ms | {r['mask_ms_p50']:.3f} ms "
              f"| {r['mask_ms_p99']:.3f} ms | {r['walks_completed']} | {r['valid']} | {r['accepted_by_other']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
