"""Each family's own chat template renders tools and calls as transformers renders it, and the calls the
template asks for (hermes <tool_call> blocks, Llama 3 JSON, Mistral [TOOL_CALLS]) are held to the tools by
the grammar and parsed back, unary and streamed, through the OpenAI front of a real mesh."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmmesh.v1 import common_pb2, gateway_pb2
from services.gateway.tool_parsers import make_parser
from services.gateway.tools import ToolFormat, tool_grammar
from services.tokenizer.text import Message, TextTokenizer
from services.tokenizer.tool_prompt import Call, ToolDef, mistral_call_id

from .chat_templates import FAMILIES

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [ToolDef("get_weather", "Weather in a city, in 'C & <units>'", CITY), ToolDef("get_time")]
HISTORY = [Message("system", "Be brief."), Message("user", "Weather in Paris?"),
           Message("assistant", "", (Call("call_0123456789abcdef01234567", "get_weather", '{"city": "Paris"}'),)),
           Message("tool", '{"celsius": 21}', tool_call_id="call_0123456789abcdef01234567"),
           Message("assistant", "It is 21 C."), Message("user", "And in Oslo?")]


def tokenizer_dir(root: Path, family: str, real_model_dir: Path) -> Path:
    """A checkpoint's tokenizer files: the real vocabulary, the family's special tokens, its template."""
    from tokenizers import AddedToken, Tokenizer

    model_type, template, specials, bos, eos = FAMILIES[family]
    out = root / family
    out.mkdir(exist_ok=True)
    tok = Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": template}))
    (out / "config.json").write_text(json.dumps({"model_type": model_type}))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, real_model_dir):
    root = tmp_path_factory.mktemp("tool-formats")
    return {f: tokenizer_dir(root, f, real_model_dir) for f in FAMILIES}


def _hf_render(model_dir: Path, messages: list[Message], tools: list[ToolDef], mistral_ids: bool) -> str:
    from transformers import AutoTokenizer

    ids = mistral_call_id if mistral_ids else str
    shown = []
    for m in messages:
        item = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": ids(c.id), "type": "function",
                                   "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = ids(m.tool_call_id)
        shown.append(item)
    return AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        shown, tools=[t.as_hf() for t in tools], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family,tool_format", [("qwen2", "hermes"), ("llama3", "llama3_json"),
                                                ("mistral", "mistral")])
def test_each_familys_template_renders_tools_as_transformers_does(dirs, family, tool_format):
    tok = TextTokenizer(dirs[family])
    assert tok.renders_tools and tok.tool_format == tool_format  # the template's own format, found
    ours = tok.render_chat(HISTORY, TOOLS)
    assert ours == _hf_render(dirs[family], HISTORY, TOOLS, mistral_ids=family == "mistral")
    assert "'C & <units>'" in ours  # tojson as transformers': no HTML escaping


def test_the_format_follows_the_family_where_the_template_names_none_and_the_flag_overrides(dirs, tmp_path,
                                                                                           real_model_dir):
    plain = tmp_path / "plain.jinja"  # renders tools, names no call marker
    plain.write_text("{% for t in tools or [] %}{{ t.function.name }} {% endfor %}"
                     "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert TextTokenizer(dirs["llama3"], plain).tool_format == "llama3_json"
    assert TextTokenizer(dirs["qwen2"], plain).tool_format == "hermes"
    assert TextTokenizer(dirs["qwen2"], tool_format="llama3_json").tool_format == "llama3_json"
    assert TextTokenizer(real_model_dir).tool_format == "hermes"  # SmolLM2's: tools folded in, hermes
    with pytest.raises(ValueError, match="expected one of hermes, llama3_json, mistral"):
        TextTokenizer(real_model_dir, tool_format="pythonic")


def test_a_folded_template_asks_for_the_overridden_format(real_model_dir):
    tok = TextTokenizer(real_model_dir, tool_format="mistral")
    text = tok.render_chat(HISTORY[1:4], TOOLS)
    assert '[TOOL_CALLS] [{"name": <function-name>' in text  # the instructions
    assert '<|im_start|>assistant\n[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]' in text


def test_mistrals_marker_is_one_token_and_survives_decoding(dirs):
    tok = TextTokenizer(dirs["mistral"])
    marker = tok.tokenizer.token_to_id("[TOOL_CALLS]")
    assert tok.tool_marker_id == marker
    assert tok.decode([marker, *tok.tokenizer.encode(" [", add_special_tokens=False).ids]) == "[TOOL_CALLS] ["
    assert tok.decode([tok.tokenizer.token_to_id("</s>")]) == ""  # the other special tokens still drop


def _request(choice: dict | None = None, parallel: bool | None = None) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="Weather in Paris?")],
        tools=[common_pb2.Tool(name="get_weather", parameters=json.dumps(CITY)), common_pb2.Tool(name="get_time")])
    if choice is not None:
        request.tool_choice.CopyFrom(common_pb2.ToolChoice(**choice))
    if parallel is not None:
        request.parallel_tool_calls = parallel
    return request


LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TIME = '{"name": "get_time", "parameters": {}}'
MISTRAL_CALL = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
MISTRAL_TWO = MISTRAL_CALL[:-1] + ', {"name": "get_time", "arguments": {}}]'
ANSWERS = {
    # text, one call, two calls, text then a call, off-schema arguments, an unknown function
    "llama3": ["It is sunny.", LLAMA_CALL, f"{LLAMA_CALL}; {LLAMA_TIME}", f"Sure. {LLAMA_CALL}",
               '{"name": "get_weather", "parameters": {"city": "Rome"}}', '{"name": "launch", "parameters": {}}'],
    "mistral": ["It is sunny.", MISTRAL_CALL, MISTRAL_TWO, f"Sure. {MISTRAL_CALL}",
                '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]',
                '[TOOL_CALLS] [{"name": "launch", "arguments": {}}]'],
}


@pytest.fixture(scope="module")
def matchers(dirs):
    """Each family's tokenizer, and the shard's grammar compiler over its vocabulary."""
    from services.model_shard.engine.grammar import Grammars

    out = {}
    for family in ("llama3", "mistral"):
        tok = TextTokenizer(dirs[family])
        out[family] = tok, Grammars.from_model_dir(dirs[family], tok.vocab_size, tok.eos_token_ids)
    return out


@pytest.mark.parametrize("family", ["llama3", "mistral"])
@pytest.mark.parametrize("choice,parallel,accepted", [
    # auto: text (a call after text is text), or calls leading the answer
    (None, None, [True, True, True, True, False, False]),
    (None, False, [True, True, False, True, False, False]),
    ({"required": True}, None, [False, True, True, False, False, False]),
    ({"function": "get_weather"}, None, [False, True, False, False, False, False]),
])
def test_each_tool_choice_allows_exactly_its_answers_in_the_familys_format(matchers, family, choice, parallel,
                                                                         accepted):
    import llguidance

    tok, grammars = matchers[family]
    fmt = ToolFormat(tok.tool_format, tok.tool_marker_id)
    grammar = tool_grammar(_request(choice, parallel), fmt)
    assert not llguidance.LLMatcher.validate_grammar(grammar, grammars.tokenizer)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(grammars.tokenizer, grammar, log_level=0)
        return (matcher.consume_tokens(tok.tokenizer.encode(text, add_special_tokens=False).ids)
                and matcher.consume_token(tok.eos_token_ids[0]))

    if family == "mistral":  # the marker is a special token, which text never is: after text, no call
        accepted = [*accepted[:3], False, *accepted[4:]]
    assert [accepts(t) for t in ANSWERS[family]] == accepted


def _parse_in_pieces(tool_format: str, text: str, size: int):
    parser, out, calls = make_parser({"get_weather", "get_time"}, ToolFormat(tool_format)), [], []
    for i in range(0, len(text), size):
        piece, made = parser.feed(text[i:i + size])
        out.append(piece)
        calls += made
    out.append(parser.flush())
    return "".join(out), [(c.name, json.loads(c.arguments)) for c in calls]


BOTH = [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_the_leading_call_parsers_find_every_call_however_the_text_is_cut(size):
    assert _parse_in_pieces("llama3_json", f"\n{LLAMA_CALL}; {LLAMA_TIME}", size) == ("", BOTH)
    assert _parse_in_pieces("llama3_json", f"<|python_tag|>{LLAMA_CALL}", size) == ("", BOTH[:1])
    assert _parse_in_pieces("mistral", f"{MISTRAL_TWO} Done.", size) == ("Done.", BOTH)
    # Text is text, a marker's prefix that goes nowhere too; a broken or unknown call stays text.
    assert _parse_in_pieces("llama3_json", "<b>{x}</b>", size) == ("<b>{x}</b>", [])
    assert _parse_in_pieces("mistral", "[TOOL] no", size) == ("[TOOL] no", [])
    assert _parse_in_pieces("llama3_json", LLAMA_CALL[:30], size) == (LLAMA_CALL[:30], [])  # cut by max_tokens
    unknown = '[TOOL_CALLS] [{"name": "launch", "arguments": {}}]'
    assert _parse_in_pieces("mistral", unknown, size) == (unknown, [])
    assert _parse_in_pieces("llama3_json", f"{LLAMA_CALL}; nope", size) == ("; nope", BOTH[:1])


@pytest.fixture(scope="module")
def tool_mesh(request, dirs, tmp_path_factory):
    """A mesh of processes serving a tiny random Llama with the family's tokenizer and template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.launcher import Mesh, plan_mesh

    from .conftest import free_ports

    family = request.param
    model_dir = tmp_path_factory.mktemp(f"tool-model-{family}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dirs[family] / name, model_dir)
    tok = TextTokenizer(dirs[family])
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=2048, tie_word_embeddings=True,
                                 eos_token_id=tok.eos_token_ids)).save_pretrained(model_dir)
    ports = free_ports(8)
    plan = plan_mesh(str(model_dir), shards=1, gateway_port=ports[0], ports=ports[1:4], metrics_ports=[0, 0, 0],
                     gateway_metrics_port=0, shard_args=["--kv-cache-mb", "32", "--dtype", "float32"],
                     gateway_args=["--http-listen", f"127.0.0.1:{ports[4]}", "--no-response-cache"])
    with Mesh(plan, log_dir=tmp_path_factory.mktemp(f"tool-mesh-{family}")) as mesh:
        mesh.start(timeout=120)
        yield family, model_dir.name, f"http://127.0.0.1:{ports[4]}/v1"


@pytest.mark.e2e
@pytest.mark.parametrize("tool_mesh", ["mistral"], indirect=True)  # its marker is a special token: the hardest
def test_calls_in_the_familys_format_come_back_parsed_unary_and_streamed(tool_mesh):
    import openai

    family, model, base_url = tool_mesh
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[weather],
                  tool_choice="required", parallel_tool_calls=False, max_tokens=40, temperature=0)
    reply = client.chat.completions.create(**kwargs).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()  # the marker is no text
