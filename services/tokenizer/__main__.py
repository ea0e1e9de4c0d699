"""python -m services.tokenizer --model PATH [--listen HOST:PORT]"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from llmmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.cli import add_service_args, env_default, instance_id, internal_token_from_args, tls_from_args
from services.common.logs import setup_logging
from services.common.server import ServeOptions, serve
from services.common.telemetry import setup_tracing
from services.tokenizer.server import TokenizerServicer
from services.tokenizer.text import TextTokenizer
from services.tokenizer.tool_prompt import TOOL_FORMATS

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.tokenizer", description="llm-mesh tokenizer service")
    add_service_args(parser, "tokenizer", "127.0.0.1:50052")
    parser.add_argument("--model", default=env_default("LLMMESH_MODEL", "models/SmolLM2-135M-Instruct"))
    parser.add_argument("--chat-template", help="a Jinja chat template file used instead of the model's own; one "
                        "that reads `tools` renders tool definitions itself (see services/tokenizer/tool_prompt.py)")
    parser.add_argument("--tool-call-format", choices=["auto", *TOOL_FORMATS],
                        default=env_default("LLMMESH_TOOL_CALL_FORMAT", "auto"),
                        help="the format the model is asked to write tool calls in and the gateway parses: hermes "
                             "(<tool_call> blocks), llama3_json ({\"name\", \"parameters\"}), mistral ([TOOL_CALLS]); "
                             "auto: the one the chat template writes, else the model family's, else hermes")
    args = parser.parse_args(argv)
    setup_logging("tokenizer", args.log_level, args.log_format)
    setup_tracing("tokenizer", instance_id(args.listen))
    token = internal_token_from_args(parser, args)
    tool_format = None if args.tool_call_format == "auto" else args.tool_call_format
    model = Path(args.model)
    if model.suffix == ".gguf" and model.is_file():  # its tokenizer, converted once beside it
        from services.model_shard.model.families import UnsupportedModel
        from services.model_shard.model.gguf_checkpoint import open_gguf

        try:
            model = open_gguf(model)
        except (UnsupportedModel, OSError) as exc:
            parser.error(f"cannot serve {args.model}: {exc}")
    if not (model / "tokenizer.json").exists():
        parser.error(f"{args.model} has no tokenizer (tokenizer.json; a GGUF file's is converted with transformers)")
    tokenizer = TextTokenizer(model, args.chat_template, tool_format)
    log.info("tool calls are written and read as %s", tokenizer.tool_format)
    servicer = TokenizerServicer(tokenizer)

    def register(server):
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)
        return [tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    asyncio.run(serve(ServeOptions("tokenizer", args.listen, args.metrics_port, args.grace, tls_from_args(args),
                                   args.tls_client_auth, internal_token=token), register))


if __name__ == "__main__":
    main()
