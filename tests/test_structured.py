"""Constrained decoding with the real model: every answer to a JSON Schema validates, regex answers
full-match, choices are one of the options, grammars parse; unconstrained neighbours in the batch get
their own tokens; bad specs are refused with what is wrong (engine/grammar.py)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from services.model_shard.engine.engine import EngineConfig, LLMEngine
from services.model_shard.engine.grammar import OutputSpec
from services.model_shard.engine.request import FinishReason, SamplingParams
from services.tokenizer.text import Message, TextTokenizer
from tests.json_schemas import SCHEMAS

QUESTION = "Answer with JSON only: describe something from everyday life."


@pytest.fixture(scope="module")
def engine(real_model_dir):
    return LLMEngine.from_dir(real_model_dir, EngineConfig(dtype="bfloat16", quantization="int4",
                                                           kv_cache_bytes=64 << 20))


@pytest.fixture(scope="module")
def chat(real_model_dir):
    tok = TextTokenizer(real_model_dir)
    return tok, tok.encode_chat([Message("user", QUESTION)])


def _answers(engine, prompt, specs, max_tokens=96, **sampling):
    seqs = [engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=max_tokens, structured=spec, **sampling))
            for i, spec in enumerate(specs)]
    while engine.has_work:
        engine.step()
    return seqs


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "seeded"])
def test_every_answer_to_a_schema_validates(engine, chat, sampling):
    tok, prompt = chat
    specs = [OutputSpec("json_schema", json.dumps(s)) for s in SCHEMAS]
    for schema, seq in zip(SCHEMAS, _answers(engine, prompt, specs, **sampling)):
        text = tok.decode(seq.output_token_ids)
        assert seq.finish_reason is FinishReason.STOP, (schema, text)
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_regex_choice_grammars_and_json_object(engine, chat, real_model_dir):
    tok, prompt = chat
    gbnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    lark = 'start: "colour: " COLOUR\nCOLOUR: "red" | "green" | "blue"'
    specs = [OutputSpec("regex", r"[A-Z][a-z]{2,8} [0-9]{1,3}"), OutputSpec("choice", json.dumps(["alpha", "beta"])),
             OutputSpec("gbnf", gbnf), OutputSpec("lark", lark)]
    seqs = _answers(engine, prompt, specs)
    assert all(s.finish_reason is FinishReason.STOP for s in seqs)
    texts = [tok.decode(s.output_token_ids) for s in seqs]
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,3}", texts[0])
    assert texts[1] in ("alpha", "beta")
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", texts[2])
    assert re.fullmatch(r"colour: (red|green|blue)", texts[3])
    person = tok.encode_chat([Message("user", "Give me a JSON object with a person's name and age.")])
    seq = _answers(engine, person, [OutputSpec("json_object", "")])[0]
    assert seq.finish_reason is FinishReason.STOP and isinstance(json.loads(tok.decode(seq.output_token_ids)), dict)


def test_unconstrained_neighbours_get_the_tokens_they_get_alone(engine, chat):
    _, prompt = chat
    free = SamplingParams(max_tokens=24)
    alone = engine.generate([prompt], free)[0]
    spec = OutputSpec("json_schema", json.dumps(SCHEMAS[0]))
    seqs = [engine.add_request("c", prompt, SamplingParams(max_tokens=24, structured=spec)),
            engine.add_request("f", prompt, free)]
    while engine.has_work:
        engine.step()
    assert seqs[1].output_token_ids == alone
    # And the constrained one is what it is alone too.
    again = engine.add_request("c2", prompt, SamplingParams(max_tokens=24, structured=spec))
    while engine.has_work:
        engine.step()
    assert again.output_token_ids == seqs[0].output_token_ids


def test_a_resumed_stream_continues_its_grammar_from_the_delivered_tokens(engine, chat):
    tok, prompt = chat
    spec = OutputSpec("json_schema", json.dumps(SCHEMAS[14]))
    params = dict(max_tokens=96, temperature=0.8, seed=9, structured=spec)
    first = engine.add_request("w", prompt, SamplingParams(**params))
    while engine.has_work:
        engine.step()
    delivered = first.output_token_ids[:5]
    resumed = engine.add_request("r", prompt + delivered, SamplingParams(**{**params, "max_tokens": 91},
                                                                          skip_draws=len(delivered)))
    while engine.has_work:
        engine.step()
    assert delivered + resumed.output_token_ids == first.output_token_ids
    jsonschema.validate(json.loads(tok.decode(first.output_token_ids)), SCHEMAS[14])


def test_a_cut_answer_is_reported_as_length(engine, chat):
    _, prompt = chat
    spec = OutputSpec("json_schema", json.dumps(SCHEMAS[14]))
    seq = engine.add_request("cut", prompt, SamplingParams(max_tokens=3, structured=spec))
    while engine.has_work:
        engine.step()
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.output_token_ids) == 3


@pytest.mark.parametrize("spec,fragment", [
    (OutputSpec("json_schema", "{not json"), "json_schema is not JSON"),
    (OutputSpec("json_schema", '{"type": "frobnicate"}'), "frobnicate"),
    (OutputSpec("regex", "(unclosed"), "unclosed group"),
    (OutputSpec("lark", "start: undefined_rule"), "undefined_rule"),
    (OutputSpec("gbnf", "root ::= undefined"), "undefined"),
    (OutputSpec("choice", "[]"), "non-empty list"),
])
def test_bad_specs_are_refused_with_what_is_wrong(engine, chat, spec, fragment):
    _, prompt = chat
    with pytest.raises(ValueError, match=re.escape(fragment)):
        engine.add_request("bad", prompt, SamplingParams(max_tokens=4, structured=spec))
    assert not engine.has_work
