"""OpenAI's `response_format`, and the structured-output fields vLLM's users send, as one
llmmesh.v1.StructuredOutput.

- `response_format`: {"type": "text"} (free text), {"type": "json_object"}, or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (what the OpenAI
  SDK's `chat.completions.parse(response_format=PydanticModel)` sends).
- vLLM's `structured_outputs`: {"json": schema, "regex": ..., "choice": [...], "grammar": ...}, and its
  older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, still in much client
  code. A grammar is GBNF when it defines rules with `::=` (llama.cpp's and xgrammar's dialect), else
  llguidance's Lark.
At most one of them may be given.
"""

from __future__ import annotations

import json
from typing import Any

from llmmesh.v1 import common_pb2
from services.gateway.openai_requests import BadParam


def structured_output(body: Any) -> common_pb2.StructuredOutput | None:
    """The one constraint the request asks for, or None for free text."""
    asked = _asked(body)
    if len(asked) > 1:
        raise BadParam(f"send one structured output, not {' and '.join(name for name, _ in asked)}",
                              asked[1][0])
    if not asked:
        return None
    name, (kind, value) = asked[0]
    out = common_pb2.StructuredOutput()
    if kind == "json_schema":
        if not isinstance(value, (dict, bool)):
            raise BadParam(f"{name}: the schema must be a JSON object", name)
        out.json_schema = json.dumps(value)
    elif kind == "json_object":
        out.json_object = True
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(o, str) and o for o in value):
            raise BadParam(f"{name} must be a non-empty list of non-empty strings", name)
        out.choice.options.extend(value)
    elif kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise BadParam(f"{name} must be a grammar (GBNF or Lark text)", name)
        if "::=" in value:
            out.gbnf = value
        else:
            out.lark = value
    else:  # regex
        if not isinstance(value, str) or not value:
            raise BadParam(f"{name} must be a regular expression", name)
        out.regex = value
    return out


def _asked(body: Any) -> list[tuple[str, tuple[str, Any]]]:
    extra = body.model_extra or {}
    asked = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise BadParam("response_format.type must be text, json_object or json_schema", "response_format")
        if fmt["type"] == "json_object":
            asked.append(("response_format", ("json_object", None)))
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise BadParam("response_format.json_schema needs a schema", "response_format.json_schema")
            asked.append(("response_format", ("json_schema", spec["schema"])))
    structured = extra.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise BadParam("structured_outputs must be an object", "structured_outputs")
        for key, kind in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
            if structured.get(key) is not None:
                asked.append((f"structured_outputs.{key}", (kind, structured[key])))
        unknown = set(structured) - {"json", "regex", "choice", "grammar"}
        if unknown:
            raise BadParam(f"structured_outputs.{sorted(unknown)[0]} is not served (json, regex, choice, "
                                  "grammar are)", "structured_outputs")
    for key, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if extra.get(key) is not None:
            value = extra[key]
            if kind == "json_schema" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise BadParam(f"{key} is not JSON: {exc}", key) from None
            asked.append((key, (kind, value)))
    return asked

