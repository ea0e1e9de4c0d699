"""The model's tokenizer and chat template, loaded from a model folder (no transformers needed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from services.tokenizer.tool_prompt import (MISTRAL_CALLS, TOOL_FORMATS, Call, ToolDef, detect_format,
                                            folded_messages, hf_messages)

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[Call, ...] = ()  # an assistant's calls
    tool_call_id: str = ""  # a tool message: the call it answers
    name: str = ""  # a tool message: the function's name


class ChatTemplateError(ValueError):
    pass


class TextTokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | Path | None = None, tool_format: str | None = None):
        """chat_template: a Jinja file used instead of the model's own (e.g. one that renders tools);
        tool_format: the call format the model is asked for and read back in (None: the template's)."""
        model_dir = Path(model_dir)
        self.name = model_dir.name
        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if chat_template is not None:
            template = Path(chat_template).read_text()
        env = _template_environment()
        self._template = env.from_string(template) if template else None
        # A template that reads `tools` shows them itself; others get them folded in (tool_prompt.py).
        self.renders_tools = bool(template) and "tools" in meta.find_undeclared_variables(env.parse(template))
        if tool_format is not None and tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool call format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
        model_type = _read_json(model_dir / "config.json").get("model_type", "")
        self.tool_format = tool_format or detect_format(template, self.renders_tools, model_type)
        self.tokenizer_json = _marker_kept((model_dir / "tokenizer.json").read_text(), self.tool_format)
        self.version = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)
        # Where the format's marker is one token of the vocabulary, the grammar names that token.
        marker_id = self.tokenizer.token_to_id(MISTRAL_CALLS) if self.tool_format == "mistral" else None
        self.tool_marker_id = marker_id if marker_id is not None and self.tokenizer.decode(
            [marker_id], skip_special_tokens=False) == MISTRAL_CALLS else None
        self._special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos_ids = set()
        gen_config = _read_json(model_dir / "generation_config.json")
        for source in (gen_config.get("eos_token_id"), _read_json(model_dir / "config.json").get("eos_token_id")):
            eos_ids.update(source if isinstance(source, list) else [] if source is None else [source])
        if self._special["eos_token"]:
            eos_ids.add(self.tokenizer.token_to_id(self._special["eos_token"]))
        self.eos_token_ids = sorted(i for i in eos_ids if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[Message], tools: list[ToolDef] = ()) -> str:
        if self._template is None:
            raise ChatTemplateError(f"model {self.name} has no chat template; send a prompt instead")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise ChatTemplateError(f"messages[{i}].role is {m.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        tools = list(tools)
        if self.renders_tools:
            shown = {"messages": hf_messages(messages, self.tool_format),
                     **({"tools": [t.as_hf() for t in tools]} if tools else {})}
        else:
            shown = {"messages": folded_messages(messages, tools, self.tool_format)}
        return self._template.render(**shown, add_generation_prompt=True, **self._special)

    def encode_chat(self, messages: list[Message], tools: list[ToolDef] = ()) -> list[int]:
        return self.encode_chat_after([], messages, tools)[0]

    def encode_chat_after(self, context_ids: list[int], messages: list[Message],
                          tools: list[ToolDef] = ()) -> tuple[list[int], int]:
        """The conversation's token ids, reusing context_ids (an earlier turn's prompt and answer) as
        they are when the rendering starts with their text: (ids, how many were reused)."""
        rendered = self.render_chat(messages, tools)
        if context_ids:
            before = self.decode(context_ids, skip_special_tokens=False)
            if before and rendered.startswith(before) and "\ufffd" not in before:
                rest = self.tokenizer.encode(rendered[len(before):], add_special_tokens=False).ids
                return list(context_ids) + rest, len(context_ids)
        # The template writes the special tokens itself.
        return self.tokenizer.encode(rendered, add_special_tokens=False).ids, 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in: a sandbox, blocks trimmed, loop
    controls, and its tojson (no HTML escaping, keys in their order, indent and separators)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _marker_kept(tokenizer_json: str, tool_format: str) -> str:
    """The vocabulary with the format's call marker no longer special, so that decoding (which drops
    special tokens) keeps it in the text the gateway's parser reads."""
    if tool_format != "mistral" or MISTRAL_CALLS not in tokenizer_json:
        return tokenizer_json
    data = json.loads(tokenizer_json)
    for token in data.get("added_tokens", []):
        if token.get("content") == MISTRAL_CALLS:
            token["special"] = False
    return json.dumps(data, ensure_ascii=False)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _raise_template_error(message: str):
    raise ChatTemplateError(message)
