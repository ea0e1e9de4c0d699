"""Tool calls without a network: the grammar each tool_choice gives (checked with llguidance against
the real tokenizer), the parser that takes calls out of streamed text, how tools reach the prompt, and
the requests that are refused."""

from __future__ import annotations

import json

import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.tool_parsers import HermesParser
from services.gateway.tools import tool_grammar
from services.gateway.validation import InvalidRequest, Limits, check_request
from services.model_shard.engine.grammar import Grammars
from services.tokenizer.text import Message, TextTokenizer
from services.tokenizer.tool_prompt import Call, ToolDef

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
           "required": ["city"], "additionalProperties": False}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
BAD_ARGUMENTS = '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>'
UNKNOWN = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'


def _request(choice: dict | None = None, parallel: bool | None = None) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="Weather in Paris?")],
        tools=[common_pb2.Tool(name="get_weather", description="Weather in a city", parameters=json.dumps(WEATHER)),
               common_pb2.Tool(name="get_time")])
    if choice is not None:
        request.tool_choice.CopyFrom(common_pb2.ToolChoice(**choice))
    if parallel is not None:
        request.parallel_tool_calls = parallel
    return request


@pytest.fixture(scope="module")
def grammars(real_model_dir):
    tok = TextTokenizer(real_model_dir)
    return tok, Grammars.from_model_dir(real_model_dir, tok.vocab_size, tok.eos_token_ids)


def _accepts(grammars, request, text: str) -> bool:
    import llguidance

    tok, g = grammars
    matcher = llguidance.LLMatcher(g.tokenizer, tool_grammar(request), log_level=0)
    return matcher.consume_tokens(tok.tokenizer.encode(text, add_special_tokens=False).ids) \
        and matcher.consume_token(tok.eos_token_ids[0])


@pytest.mark.parametrize("choice,parallel,accepted", [
    # text, one call, text around a call, two calls, arguments off-schema, an unknown function, another tool
    (None, None, [True, True, True, True, False, False, True]),  # auto
    (None, False, [True, True, False, False, False, False, True]),  # auto, one call at most, ending the answer
    ({"required": True}, None, [False, True, False, True, False, False, True]),
    ({"required": True}, False, [False, True, False, False, False, False, True]),
    ({"function": "get_weather"}, None, [False, True, False, False, False, False, False]),
])
def test_each_tool_choice_allows_exactly_its_answers(grammars, choice, parallel, accepted):
    texts = ["It is sunny.", CALL, f"Let me check. {CALL} Done.", f"{CALL}\n{CALL}", BAD_ARGUMENTS, UNKNOWN,
             CALL_TIME]
    assert [_accepts(grammars, _request(choice, parallel), t) for t in texts] == accepted


def test_tool_choice_none_has_no_grammar():
    assert tool_grammar(_request({"none": True})) is None
    assert tool_grammar(gateway_pb2.GenerateRequest(prompt="hi")) is None


def _parse_in_pieces(text: str, size: int) -> tuple[str, list[common_pb2.ToolCall]]:
    parser, out, calls = HermesParser({"get_weather", "get_time"}), [], []
    for i in range(0, len(text), size):
        piece, made = parser.feed(text[i:i + size])
        out.append(piece)
        calls += made
    out.append(parser.flush())
    return "".join(out), calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_the_parser_finds_every_call_however_the_text_is_cut(size):
    text, calls = _parse_in_pieces(f"Let me check.\n{CALL}\n{CALL_TIME}\nDone <tool", size)
    assert text == "Let me check.\nDone <tool"  # one separator kept; an unfinished marker is text
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                    ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_calls_alone_leave_no_text_and_broken_calls_stay_text(size):
    assert _parse_in_pieces(f"{CALL}\n{CALL}", size)[0] == ""
    text, calls = _parse_in_pieces(f"{UNKNOWN} and {CALL[:30]}", size)  # unknown name; cut by max_tokens
    assert calls == [] and text == f"{UNKNOWN} and {CALL[:30]}"


def test_tools_are_folded_into_a_template_that_does_not_render_them(real_model_dir):
    tok = TextTokenizer(real_model_dir)
    assert not tok.renders_tools
    history = [Message("user", "Weather in Paris?"),
               Message("assistant", "", (Call("call_1", "get_weather", '{"city": "Paris"}'),)),
               Message("tool", '{"celsius": 21}', tool_call_id="call_1"),
               Message("tool", '{"celsius": 22}', tool_call_id="call_2")]
    text = tok.render_chat(history, [ToolDef("get_weather", "Weather in a city", WEATHER)])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                        "parameters": WEATHER}}) in text
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in text
    # Two results, one user turn.
    assert ("<|im_start|>user\n<tool_response>\n{\"celsius\": 21}\n</tool_response>\n<tool_response>\n"
            "{\"celsius\": 22}\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text
    plain = [Message("user", "hi")]
    assert tok.render_chat(plain) == tok.render_chat(plain, [])  # no tools: the template's own text


def test_a_chat_template_that_renders_tools_gets_them_in_hugging_faces_shapes(real_model_dir, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% if tools %}TOOLS{% for t in tools %} {{ t.function.name }}:{{ t.function.parameters | tojson }}"
        "{% endfor %}\n{% endif %}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}\n{% endfor %}")
    tok = TextTokenizer(real_model_dir, template)
    assert tok.renders_tools
    history = [Message("user", "Weather?"), Message("assistant", "", (Call("c1", "get_weather", '{"city": "Oslo"}'),)),
               Message("tool", "cold", tool_call_id="c1")]
    assert tok.render_chat(history, [ToolDef("get_weather", "", WEATHER)]) == (
        # (trim_blocks eats the newlines after block tags, and tojson keeps the keys in order, as transformers renders)
        f"TOOLS get_weather:{json.dumps(WEATHER)}[user]Weather?[assistant] CALL get_weather Oslo"
        "[tool]cold FOR c1")


@pytest.mark.parametrize("change,fragment", [
    (lambda r: r.tool_choice.CopyFrom(common_pb2.ToolChoice(function="launch")), "not among the tools"),
    (lambda r: r.tools.add(name="get_time"), "two tools are named"),
    (lambda r: r.tools.add(name="has space"), "letters, digits"),
    (lambda r: r.tools.add(name="f", parameters="[1]"), "JSON Schema"),
    (lambda r: r.tools.add(name="f", parameters="{nope"), "not JSON"),
    (lambda r: r.sampling.structured.CopyFrom(common_pb2.StructuredOutput(json_object=True)), "cannot be combined"),
    (lambda r: r.messages.add(role="tool", content="21"), "without tool_call_id"),
    (lambda r: r.messages.add(role="user", tool_calls=[common_pb2.ToolCall(name="f", arguments="{}")]),
     "only assistant"),
    (lambda r: r.messages.add(role="assistant", tool_calls=[common_pb2.ToolCall(name="f", arguments="1")]),
     "must be a JSON object"),
])
def test_bad_tool_requests_are_refused_with_what_is_wrong(change, fragment):
    request = _request()
    check_request(request, Limits())
    change(request)
    with pytest.raises(InvalidRequest, match=fragment):
        check_request(request, Limits())


def test_tools_need_a_chat_and_tool_choice_needs_tools():
    with pytest.raises(InvalidRequest, match="chat request"):
        check_request(gateway_pb2.GenerateRequest(prompt="hi", tools=[common_pb2.Tool(name="f")]), Limits())
    with pytest.raises(InvalidRequest, match="needs tools"):
        check_request(gateway_pb2.GenerateRequest(prompt="hi", tool_choice=common_pb2.ToolChoice(required=True)),
                      Limits())
