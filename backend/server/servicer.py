"""The ``loraplex.v1.InferenceService`` servicer: thin glue between the wire and the engine.

Protobuf is converted at the edge (``convert``), errors map to status codes in
one place (``errors.grpc_errors``), metrics and spans are observed on the way
through. Cancelling a Generate call (client cancel, deadline, disconnect)
cancels this handler, which closes the engine's output iterator, which aborts
the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator

import grpc
from opentelemetry import trace

from loraplex import __version__
from loraplex.backend.engine.protocol import EngineClient
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.metrics import Metrics, RequestTracker
from loraplex.backend.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS
from loraplex.backend.server import control, convert
from loraplex.backend.server.errors import grpc_errors, status_of
from loraplex.backend.server.messages import Msg
from loraplex.backend.tracing import GenerateSpanRecorder, extract_context, request_attributes
from loraplex.clients.v1 import inference_pb2 as pb
from loraplex.clients.v1 import inference_pb2_grpc as pb_grpc
from loraplex.errors import EngineDrainingError, InvalidRequestError, QueueFullError

TOKEN_TEXT_CACHE = 65536


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Serves one engine client (in-process or core process); ``features`` lists what the assembly
    turned on (auth, tls...)."""

    def __init__(self, engine: EngineClient, metrics: Metrics, tracer: trace.Tracer, features: tuple[str, ...] = ()):
        self.engine = engine
        self.metrics = metrics
        self.tracer = tracer
        self.features = features
        self.draining = False
        self._token_text = functools.lru_cache(maxsize=TOKEN_TEXT_CACHE)(self._decode_token)
        scheduler = engine.config.scheduler
        self._capacity = scheduler.max_waiting_requests + scheduler.max_num_seqs  # as the front end's bound

    def _decode_token(self, token_id: int) -> str:  # logprob token texts: the front end's own tokenizer
        return self.engine.input_processor.detokenize([token_id], skip_special_tokens=False)

    # ---- Generate ----------------------------------------------------------------------------

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        entered = time.perf_counter()
        if not self.draining and self.engine.num_unfinished() >= self._capacity:
            # a flood's refusals cost only this: no span, no conversion, no tokenizing (the front
            # end's own check, reached with no await in between, stays the one that reserves)
            self.metrics.refused_at_capacity(time.perf_counter() - entered)
            raise QueueFullError(Msg.AT_CAPACITY.format(count=self.engine.num_unfinished()))
        operation = "chat" if request.WhichOneof("input") == "chat" else "text_completion"
        span = self.tracer.start_span(f"{operation} {request.adapter or self.engine.model_name}",
                                      context=extract_context(context.invocation_metadata()),
                                      kind=trace.SpanKind.SERVER)
        with self.metrics.tracker() as tracker, _ending(span, tracker):
            if self.draining:
                raise EngineDrainingError(Msg.DRAINING.value)
            req = convert.request_from_pb(request)
            span.set_attributes(request_attributes(req, operation, self.engine.model_name))
            async for message in self._stream(req, span, tracker):
                yield message

    async def _stream(self, req: EngineRequest, span: trace.Span,
                      tracker: RequestTracker) -> AsyncIterator[pb.GenerateResponse]:
        recorder = GenerateSpanRecorder(span, req.adapter or self.engine.model_name)
        async with contextlib.aclosing(self.engine.generate(req)) as outputs:
            async for out in outputs:
                tracker.on_output(out)
                recorder.on_output(out)
                yield convert.output_to_pb(out, self._token_text)

    # ---- adapters ----------------------------------------------------------------------------

    @grpc_errors
    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        if not request.name:
            raise InvalidRequestError("name", Msg.ADAPTER_NAME_EMPTY.value)
        if not request.source:
            raise InvalidRequestError("source", Msg.ADAPTER_SOURCE_EMPTY.value)
        if self.draining:
            raise EngineDrainingError(Msg.DRAINING.value)
        with self._adapter_op("load", request.name, context) as span:
            span.set_attributes({"loraplex.adapter.source": request.source, "loraplex.adapter.replace":
                                 request.replace, "loraplex.adapter.pin": request.pin})
            info = await self.engine.load_adapter(request.name, request.source, revision=request.revision or None,
                                                  replace=request.replace, pinned=request.pin)
            span.set_attribute("loraplex.adapter.version", info.version)
        return pb.LoadAdapterResponse(adapter=convert.adapter_to_pb(info))

    @grpc_errors
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        if not request.name:
            raise InvalidRequestError("name", Msg.ADAPTER_NAME_EMPTY.value)
        with self._adapter_op("unload", request.name, context):
            await self.engine.unload_adapter(request.name)
        return pb.UnloadAdapterResponse()

    @grpc_errors
    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        adapters = sorted(await self.engine.list_adapters(), key=lambda a: a.name)
        return pb.ListAdaptersResponse(adapters=[convert.adapter_to_pb(a) for a in adapters])

    @contextlib.contextmanager
    def _adapter_op(self, op: str, name: str, context: grpc.aio.ServicerContext) -> Iterator[trace.Span]:
        start = time.monotonic()
        with self.tracer.start_as_current_span(f"{op}_adapter {name}", kind=trace.SpanKind.SERVER,
                                               context=extract_context(context.invocation_metadata()),
                                               attributes={"loraplex.adapter": name,
                                                           "loraplex.adapter.operation": op}) as span:
            try:
                yield span
            except Exception as exc:
                self.metrics.adapter_op(op, status_of(exc).name.lower(), time.monotonic() - start)
                raise
            self.metrics.adapter_op(op, "ok", time.monotonic() - start)

    # ---- server info -------------------------------------------------------------------------

    @grpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        e = self.engine
        cfg, props = e.config, e.properties
        limits = pb.Limits(max_model_len=props.max_model_len, max_num_seqs=cfg.scheduler.max_num_seqs,
                           max_loras=cfg.lora.max_loras, max_lora_rank=cfg.lora.max_lora_rank,
                           max_cpu_loras=cfg.lora.max_cpu_loras,
                           max_waiting_requests=cfg.scheduler.max_waiting_requests,
                           max_stop_strings=MAX_STOP_STRINGS, max_logprobs=MAX_LOGPROBS)
        return pb.GetServerInfoResponse(model=props.model_name, version=__version__, limits=limits,
                                        features=self._features(), device=props.device, dtype=props.dtype,
                                        eos_token_id=props.eos_token_id)

    def _features(self) -> list[str]:
        cfg = self.engine.config
        found = ["logprobs", "health", "stop_strings", "seed"]
        if cfg.lora.enable_lora:
            found.append("lora")
        if cfg.cache.enable_prefix_caching:
            found.append("prefix_caching")
        template = self.engine.properties.chat_template
        if template:
            found.append("chat_template")
        if "tools" in template:
            found.append("tools")
        if cfg.scheduler.policy == "priority":
            found.append("priority")
        return sorted({*found, *self.features})


@contextlib.contextmanager
def _ending(span: trace.Span, tracker: RequestTracker) -> Iterator[None]:
    """Ends a Generate span and counts the call's outcome, however it ends."""
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        tracker.finish("cancelled")
        span.add_event("cancelled")
        raise
    except Exception as exc:
        tracker.finish(status_of(exc).name.lower())
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        span.end()


class ControlServicer(InferenceServicer):
    """``InferenceServicer`` plus the control RPCs (tokens, abort by id, load, prefix-cache reset);
    the server serves this class."""

    @grpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        prompt, chat = control.tokenize_input(request)
        if chat is None:
            ids = await self.engine.tokenize(prompt, None, None, None, control.add_special_tokens(request))
        else:
            ids = await self.engine.tokenize(None, chat.messages, chat.tools, chat.template_kwargs)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    @grpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        text = await self.engine.detokenize(list(request.token_ids), control.skip_special_tokens(request))
        return pb.DetokenizeResponse(text=text)

    @grpc_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=await self.engine.abort(control.abort_request_id(request)))

    @grpc_errors
    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        return control.load_to_pb(self.engine.get_load())

    @grpc_errors
    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context: grpc.aio.ServicerContext) -> pb.ResetPrefixCacheResponse:
        return pb.ResetPrefixCacheResponse(reset=await self.engine.reset_prefix_cache())
