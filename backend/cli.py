"""The ``loraplex`` console command.

    loraplex serve [--model M] [--host H] [--port 50051] [--metrics-port 9400] ...
    loraplex generate [--target HOST:PORT] [--adapter A] [--stream] [--chat] PROMPT
    loraplex adapters load NAME SOURCE | unload NAME | list
    loraplex info
    loraplex tokenize [--chat] TEXT | detokenize ID... | abort REQUEST_ID | load | reset-prefix-cache
    loraplex gateway --backend HOST:PORT ...
    loraplex bench serve --endpoint grpc://HOST:PORT ...   (loraplex.clients.bench)

Only ``serve`` imports torch (lazily); the client commands use ``loraplex.clients``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from loraplex import __version__
from loraplex.backend.cli_args import (
    API_KEY_ENV,
    add_config_flags,
    check_model_source,
    engine_config_from_args,
    resolve_api_key,
    server_config_from_args,
)
from loraplex.clients import Client, pb
from loraplex.errors import ConfigError

DEFAULT_TARGET = "localhost:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve one base LLM and many LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gRPC server (no --model: the built-in demo model)",
                           description="Run the gRPC inference server. Every flag comes from the typed config.")
    serve.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"],
                       help="server log level (any casing, as for `loraplex gateway`); default: info")
    add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)
    _add_generate(sub)
    _add_adapters(sub)
    info = sub.add_parser("info", help="print the server's model, limits and features")
    _add_connection_flags(info)
    info.set_defaults(func=cmd_info)
    _add_control(sub)
    sub.add_parser("gateway", help="run the OpenAI-compatible REST gateway (see `loraplex gateway --help`)",
                   add_help=False)
    sub.add_parser("bench", help="benchmark a running server (see `loraplex bench serve --help`)", add_help=False)
    return parser


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=DEFAULT_TARGET, help=f"server address; default: {DEFAULT_TARGET}")
    g.add_argument("--api-key", help=f"bearer token (else --api-key-file, else ${API_KEY_ENV})")
    g.add_argument("--api-key-file", metavar="PATH", help="read the bearer token from this file")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the server with (turns TLS on)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate chain for mutual TLS")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    g.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds; default: none")


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text once, or stream it to the terminal",
                       description="Send one Generate request and print the completion.")
    g.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    g.add_argument("--adapter", default="", help="LoRA adapter name; default: the base model")
    g.add_argument("--chat", action="store_true", help="send the prompt as one user chat message "
                   "(rendered with the model's chat template)")
    g.add_argument("--system", help="with --chat: a system message before it")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--max-tokens", type=int, help="most tokens to generate; default: the server's (16)")
    g.add_argument("--temperature", type=float, help="0 = greedy; default: the server's (1.0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass; default 1")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--seed", type=int, help="per-request seed")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    g.add_argument("--request-id", default="", help="request id; default: one the server makes")
    g.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _add_connection_flags(g)
    g.set_defaults(func=cmd_generate)


def _add_adapters(sub: Any) -> None:
    a = sub.add_parser("adapters", help="load, unload or list LoRA adapters on a running server")
    verbs = a.add_subparsers(dest="verb", required=True, metavar="VERB")
    load = verbs.add_parser("load", help="load (or with --replace, reload) an adapter")
    load.add_argument("name", help="name requests will use")
    load.add_argument("source", help="adapter directory (inside the server's adapter roots) or hub id")
    load.add_argument("--revision", default="", help="hub revision")
    load.add_argument("--replace", action="store_true", help="reload an existing name as a new version")
    load.add_argument("--pin", action="store_true", help="keep its weights in host memory")
    unload = verbs.add_parser("unload", help="unload an adapter")
    unload.add_argument("name", help="its name")
    listing = verbs.add_parser("list", help="list the registered adapters")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for p in (load, unload, listing):
        _add_connection_flags(p)
        p.set_defaults(func=cmd_adapters)


def _add_control(sub: Any) -> None:
    tok = sub.add_parser("tokenize", help="print the token ids of a text (or, with --chat, of one user message "
                                          "rendered as generate renders it)")
    tok.add_argument("prompt", help="the text; '-' reads it from stdin")
    tok.add_argument("--chat", action="store_true", help="render it as one user chat message")
    tok.add_argument("--system", help="with --chat: a system message before it")
    tok.add_argument("--no-special-tokens", action="store_true", help="do not add special tokens (BOS)")
    detok = sub.add_parser("detokenize", help="print the text of token ids")
    detok.add_argument("token_ids", nargs="+", type=int, metavar="ID", help="token ids")
    detok.add_argument("--keep-special-tokens", action="store_true", help="keep special tokens in the text")
    abort = sub.add_parser("abort", help="abort a running request by its id")
    abort.add_argument("request_id", help="the request's id")
    load = sub.add_parser("load", help="print the server's load: running, waiting, KV usage, adapters")
    reset = sub.add_parser("reset-prefix-cache", help="drop the cached prefixes no running request uses")
    for p, func in ((tok, cmd_tokenize), (detok, cmd_detokenize), (abort, cmd_abort), (load, cmd_load),
                    (reset, cmd_reset_prefix_cache)):
        p.add_argument("--json", action="store_true", help="print JSON")
        _add_connection_flags(p)
        p.set_defaults(func=func)


# ---- commands ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = engine_config_from_args(args)
    server_config = server_config_from_args(args)
    check_model_source(engine_config.model.model, engine_config.model.revision)
    from loraplex.backend.server.app import run

    return run(engine_config, server_config)


def connect(args: argparse.Namespace) -> Client:
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    token = resolve_api_key(args.api_key, args.api_key_file)
    return Client(args.target, token=token, root_certificates=read(args.tls_ca),
                  private_key=read(args.tls_key), certificate_chain=read(args.tls_cert))


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = pb.SamplingParameters(top_k=args.top_k, stop=args.stop)
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    req = pb.GenerateRequest(request_id=args.request_id, adapter=args.adapter, params=params)
    if args.chat:
        messages = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
        messages.append(pb.ChatMessage(role="user", content=prompt))
        req.chat.messages.extend(messages)
    else:
        req.prompt = prompt
    return req


def cmd_generate(args: argparse.Namespace) -> int:
    req = generate_request(args)
    with connect(args) as client:
        if args.stream and not args.json:
            for chunk in client.generate_stream(req, timeout=args.timeout):
                print(chunk.text, end="", flush=True)
                if chunk.finished:
                    print()
                    _summary(chunk.finish_reason, chunk.usage, chunk.timings)
            return 0
        result = client.generate(req, timeout=args.timeout)
    if args.json:
        print(json.dumps({"request_id": result.request_id, "text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, "stop_string": result.stop_string,
                          "usage": json_format.MessageToDict(result.usage, always_print_fields_with_no_presence=True),
                          "timings": json_format.MessageToDict(result.timings)}, indent=2))
    else:
        print(result.text)
        _summary(result.finish_reason, result.usage, result.timings)
    return 0


def _summary(reason: str, usage: pb.Usage, timings: pb.Timings) -> None:
    print(f"[finish_reason={reason} prompt_tokens={usage.prompt_tokens} completion_tokens="
          f"{usage.completion_tokens} ttft={timings.time_to_first_token * 1000:.1f}ms]", file=sys.stderr)


def cmd_adapters(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.verb == "load":
            info = client.load_adapter(args.name, args.source, args.revision, args.replace, args.pin,
                                       timeout=args.timeout)
            print(f"loaded {info.name} version {info.version} (rank {info.rank})")
        elif args.verb == "unload":
            client.unload_adapter(args.name, timeout=args.timeout)
            print(f"unloaded {args.name}")
        else:
            _print_adapters(client.list_adapters(timeout=args.timeout), args.json)
    return 0


def _print_adapters(adapters: list[pb.AdapterInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([json_format.MessageToDict(a) for a in adapters], indent=2))
        return
    print(f"{'NAME':<24} {'VERSION':>7} {'RANK':>4} {'STATE':<10} {'PINNED':<6} {'RUNNING':>7}  SOURCE")
    for a in adapters:
        state = pb.AdapterState.Name(a.state).removeprefix("ADAPTER_STATE_").lower()
        print(f"{a.name:<24} {a.version:>7} {a.rank:>4} {state:<10} {a.pinned!s:<6} {a.running_requests:>7}  {a.source}")


def cmd_info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.server_info(timeout=args.timeout)
    print(json_format.MessageToJson(info))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = None
    if args.chat:
        messages = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
        chat = pb.ChatInput(messages=[*messages, pb.ChatMessage(role="user", content=text)])
    with connect(args) as client:
        ids = client.tokenize(None if chat else text, chat=chat, add_special_tokens=not args.no_special_tokens,
                              timeout=args.timeout)
    print(json.dumps({"token_ids": ids, "count": len(ids)}) if args.json else " ".join(map(str, ids)))
    return 0


def cmd_detokenize(args: argparse.Namespace) -> int:
    with connect(args) as client:
        text = client.detokenize(args.token_ids, skip_special_tokens=not args.keep_special_tokens,
                                 timeout=args.timeout)
    print(json.dumps({"text": text}) if args.json else text)
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    with connect(args) as client:
        aborted = client.abort(args.request_id, timeout=args.timeout)
    print(json.dumps({"aborted": aborted}) if args.json else
          (f"aborted {args.request_id}" if aborted else f"no running request {args.request_id!r}"))
    return 0 if aborted else 1


def cmd_load(args: argparse.Namespace) -> int:
    with connect(args) as client:
        load = client.get_load(timeout=args.timeout)
    print(json_format.MessageToJson(load, always_print_fields_with_no_presence=True) if args.json else
          f"running={load.running} waiting={load.waiting} kv_usage={load.kv_usage:.1%} "
          f"({load.kv_blocks_used}/{load.kv_blocks_total} blocks) resident={','.join(load.resident_adapters) or '-'} "
          f"loading={','.join(load.loading_adapters) or '-'} max_loras={load.max_loras}")
    return 0


def cmd_reset_prefix_cache(args: argparse.Namespace) -> int:
    with connect(args) as client:
        reset = client.reset_prefix_cache(timeout=args.timeout)
    print(json.dumps({"reset": reset}) if args.json else
          ("prefix cache reset" if reset else "prefix cache reset; blocks of running requests stay cached"))
    return 0


def run_gateway(argv: list[str]) -> int:
    try:
        from loraplex.gateway import cli as gateway_cli
    except ImportError as exc:
        print(f"loraplex gateway is not available: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="loraplex gateway",
                                     description="Run the OpenAI-compatible REST gateway in front of a backend.")
    gateway_cli.add_arguments(parser)
    return int(gateway_cli.run(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "gateway":
        return run_gateway(argv[1:])
    if argv and argv[0] == "bench":
        from loraplex.clients.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
