"""The model's tokenizer and chat template, loaded from a model folder (no transformers needed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from services.tokenizer.tool_prompt import Call, ToolDef, folded_messages, hf_messages

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
    def __init__(self, model_dir: str | Path, chat_template: str | Path | None = None):
        """chat_template: a Jinja file used instead of the model's own (e.g. one that renders tools)."""
        model_dir = Path(model_dir)
        self.name = model_dir.name
        self.tokenizer_json = (model_dir / "tokenizer.json").read_text()
        self.version = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)
        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if chat_template is not None:
            template = Path(chat_template).read_text()
        # Rendered like transformers does: a sandbox, blocks trimmed.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self._template = env.from_string(template) if template else None
        # A template that reads `tools` shows them itself; others get them folded in (tool_prompt.py).
        self.renders_tools = bool(template) and "tools" in meta.find_undeclared_variables(env.parse(template))
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
            shown = {"messages": hf_messages(messages), **({"tools": [t.as_hf() for t in tools]} if tools else {})}
        else:
            shown = {"messages": folded_messages(messages, tools)}
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _raise_template_error(message: str):
    raise ChatTemplateError(message)
