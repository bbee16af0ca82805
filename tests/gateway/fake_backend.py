"""A scripted stand-in for the loraplex gRPC server, for gateway unit tests.

One character = one token. The base model echoes the prompt (or the last chat message);
adapters: ``reverse``, ``upper``, ``think`` (``<think>…</think>`` then the echo),
``tools`` (a hermes tool call), ``slow`` (one token per 20 ms, up to max_tokens),
``crash`` (fails mid-stream), ``abort`` (ends with finish_reason "abort" and an error). Prompts ``FULL`` / ``DRAIN`` get RESOURCE_EXHAUSTED /
UNAVAILABLE; ``WAIT`` sends its first message after 5 s. Every request and its metadata are recorded; ``running`` counts live calls.
"""

from __future__ import annotations

import asyncio
import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.clients import pb, pb_grpc

BASE = "fake-base"
MAX_MODEL_LEN = 4096
VOCAB_SIZE = 0x110000  # one token per Unicode code point; surrogates are not tokens


def is_token(t: int) -> bool:
    return 0 <= t < VOCAB_SIZE and not 0xD800 <= t < 0xE000


def transform(adapter: str, text: str) -> str:
    if adapter == "reverse":
        return text[::-1]
    if adapter == "upper":
        return text.upper()
    if adapter == "think":
        return f"<think>\nabout {text}\n</think>\n\n{text}"
    if adapter == "tools":
        call = json.dumps({"name": "get_weather", "arguments": {"city": text}})
        return f"<tool_call>\n{call}\n</tool_call>"
    return text


def prompt_text(request: pb.GenerateRequest) -> str:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt
    if kind == "token_ids":
        return "".join(chr(t) for t in request.token_ids.ids)
    return request.chat.messages[-1].content if request.chat.messages else ""


class FakeServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.adapters: dict[str, pb.AdapterInfo] = {
            name: pb.AdapterInfo(name=name, version=1, source=f"/adapters/{name}", rank=8)
            for name in ("reverse", "upper", "think", "tools", "slow", "crash", "abort")
        }
        self.running = 0
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.serving = True

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        await self._check(request, context)
        self.running += 1
        try:
            async for message in self._stream(request, context):
                yield message
        finally:
            self.running -= 1

    async def _check(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        bad = [t for t in request.token_ids.ids if not is_token(t)]
        if request.WhichOneof("input") == "token_ids" and bad:
            # the real server's InputProcessor answers the same way
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: token id {bad[0]} is not in the vocabulary")
        text = prompt_text(request)
        if request.adapter and request.adapter not in self.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{request.adapter}' is not registered")
        if request.params.HasField("max_tokens") and request.params.max_tokens > MAX_MODEL_LEN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: exceeds the context")
        if text == "FULL":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
        if text == "DRAIN":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if text == "WAIT":
            await asyncio.sleep(5)

    async def _stream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        p = request.params
        text = prompt_text(request)
        out = transform(request.adapter, text)
        limit = p.max_tokens if p.HasField("max_tokens") else 16
        if request.adapter == "slow":
            out = "z" * limit
        reason, stop_string = "stop", ""
        for s in p.stop:
            if s in out:
                out, reason, stop_string = out[: out.index(s)], "stop", s
        if len(out) > limit:
            out, reason, stop_string = out[:limit], "length", ""
        error = "engine step failed" if request.adapter == "abort" else ""
        reason = "abort" if error else reason
        for i in range(0, len(out), 3):
            if request.adapter == "crash" and i >= 3:
                await context.abort(grpc.StatusCode.INTERNAL, "engine failed")
            if request.adapter == "slow":
                await asyncio.sleep(0.02)
            piece = out[i:i + 3]
            yield pb.GenerateResponse(request_id=request.request_id, text=piece, token_ids=[ord(c) for c in piece],
                                      logprobs=_logprobs(piece, p))
        yield pb.GenerateResponse(
            request_id=request.request_id, finished=True, finish_reason=reason, stop_string=stop_string, error=error,
            usage=pb.Usage(prompt_tokens=len(text), completion_tokens=len(out), cached_tokens=min(2, len(text))),
        )

    async def LoadAdapter(self, request, context):  # noqa: N802
        if request.source.startswith("/forbidden"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "source outside the allowed roots")
        if request.name in self.adapters and not request.replace:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"adapter '{request.name}' is already loaded")
        old = self.adapters.get(request.name)
        info = pb.AdapterInfo(name=request.name, source=request.source, rank=8,
                              version=(old.version + 1) if old else 1)
        self.adapters[request.name] = info
        return pb.LoadAdapterResponse(adapter=info)

    async def UnloadAdapter(self, request, context):  # noqa: N802
        if request.name not in self.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{request.name}' is not registered")
        del self.adapters[request.name]
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # noqa: N802
        return pb.ListAdaptersResponse(adapters=list(self.adapters.values()))

    async def GetServerInfo(self, request, context):  # noqa: N802
        return pb.GetServerInfoResponse(model=BASE, version="test",
                                        limits=pb.Limits(max_model_len=MAX_MODEL_LEN, max_logprobs=20,
                                                         max_stop_strings=16))


def _logprobs(piece: str, params: pb.SamplingParameters) -> list[pb.TokenLogprob]:
    if not params.HasField("logprobs"):
        return []
    alternatives = [pb.TopLogprob(token=c, token_id=ord(c), logprob=-1.0 - i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")]
    return [pb.TokenLogprob(token=c, token_id=ord(c), logprob=-0.5, rank=1,
                            top=[pb.TopLogprob(token=c, token_id=ord(c), logprob=-0.5)]
                            + alternatives[: max(0, params.logprobs - 1)])
            for c in piece]


class FakeHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, servicer: FakeServicer) -> None:
        self.servicer = servicer

    async def Check(self, request, context):  # noqa: N802
        status = health_pb2.HealthCheckResponse.SERVING if self.servicer.serving else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


async def start_fake_backend(port: int = 0) -> tuple[grpc.aio.Server, FakeServicer, int]:
    """A fake backend on a loopback port (a free one when ``port`` is 0)."""
    server = grpc.aio.server()
    servicer = FakeServicer()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(FakeHealth(servicer), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, servicer, port
