"""Ask the gateway a question and print the streamed answer.

    python -m services.client "What is the capital of France?" [--gateway 127.0.0.1:50051] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import sys

import grpc

from llmmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.client")
    parser.add_argument("question")
    parser.add_argument("--gateway", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--raw", action="store_true", help="send the text as a raw prompt, no chat template")
    args = parser.parse_args(argv)
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    if args.raw:
        request = gateway_pb2.GenerateRequest(prompt=args.question, sampling=sampling)
    else:
        request = gateway_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content=args.question)], sampling=sampling)
    with grpc.insecure_channel(args.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for chunk in stub.GenerateStream(request, timeout=300):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    u = chunk.usage
                    print(f"\n[{chunk.finish_reason}; prompt {u.prompt_tokens} tokens, completion "
                          f"{u.completion_tokens}, cached {u.cached}]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
