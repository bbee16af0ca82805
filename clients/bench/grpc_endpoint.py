"""The benchmark's gRPC side: the generated stubs through ``AsyncClient``, one streaming Generate per request."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import grpc

from loraplex.clients.aio import AsyncClient
from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.records import RequestRecord
from loraplex.clients.bench.workload import BenchRequest
from loraplex.clients.v1 import inference_pb2 as pb

# Token id past any vocabulary: the server refuses it with "outside the vocabulary [0, V)".
_PROBE_TOKEN = 2**32 - 1
_VOCAB_IN_ERROR = re.compile(r"\[0, (\d+)\)")


@dataclass
class ServerFacts:
    """What the benchmark needs to know about the server before it starts."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None = None
    device: str = ""
    dtype: str = ""
    version: str = ""


def vocab_from_error(message: str) -> int:
    match = _VOCAB_IN_ERROR.search(message)
    if not match:
        raise BenchError(f"cannot learn the vocabulary size from the server ({message!r}); pass --vocab-size")
    return int(match.group(1))


@dataclass
class SamplingChoice:
    temperature: float
    ignore_eos: bool  # fixed output lengths: ignore EOS and require max_tokens (min_tokens)


class GrpcEndpoint:
    kind = "grpc"

    def __init__(self, target: str, token: str | None, root_certificates: bytes | None,
                 private_key: bytes | None, certificate_chain: bytes | None, timeout: float | None) -> None:
        self.client = AsyncClient(target, token=token, root_certificates=root_certificates,
                                  private_key=private_key, certificate_chain=certificate_chain,
                                  options=[("grpc.max_receive_message_length", 64 * 2**20)])
        self.timeout = timeout

    async def describe(self, vocab_size: int | None) -> ServerFacts:
        info = await self.client.server_info(timeout=30)
        vocab = vocab_size or getattr(info, "vocab_size", 0) or await self._probe_vocab()
        return ServerFacts(model=info.model, max_model_len=info.limits.max_model_len, vocab_size=vocab,
                           eos_token_id=info.eos_token_id, device=info.device, dtype=info.dtype,
                           version=info.version)

    async def _probe_vocab(self) -> int:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[_PROBE_TOKEN]),
                                     params=pb.SamplingParameters(max_tokens=1))
        try:
            await self.client.generate(request, timeout=30)
        except grpc.aio.AioRpcError as err:
            return vocab_from_error(err.details() or "")
        raise BenchError("the server accepted an out-of-range token id; pass --vocab-size")

    async def adapters(self) -> list[str]:
        return sorted(a.name for a in await self.client.list_adapters(timeout=30))

    async def register(self, name: str, source: str) -> None:
        """Loads ``source`` as ``name`` (replace: a name left from an earlier run gets a new version)."""
        try:
            await self.client.load_adapter(name, source, replace=True, timeout=600)
        except grpc.aio.AioRpcError as err:
            raise BenchError(f"--register: loading {name!r} from {source!r}: {err.code().name}: "
                             f"{err.details()}") from None

    async def send(self, req: BenchRequest, sampling: SamplingChoice, rec: RequestRecord) -> None:
        message = _request(req, sampling)
        start = last = time.perf_counter()
        try:
            async for chunk in self.client.generate_stream(message, timeout=self.timeout):
                now = time.perf_counter()
                if chunk.token_ids or chunk.text:
                    if rec.ttft == 0.0:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                if chunk.finished:
                    rec.latency = now - start
                    _finish(rec, chunk)
        except grpc.aio.AioRpcError as err:
            rec.fail(err.code().name, err.details() or "")

    async def close(self) -> None:
        await self.client.close()


def _request(req: BenchRequest, sampling: SamplingChoice) -> pb.GenerateRequest:
    params = pb.SamplingParameters(temperature=sampling.temperature, ignore_eos=sampling.ignore_eos)
    if req.max_tokens is not None:
        params.max_tokens = req.max_tokens
        if sampling.ignore_eos:
            params.min_tokens = req.max_tokens
    message = pb.GenerateRequest(adapter=req.adapter, params=params)
    if isinstance(req.prompt, str):
        message.prompt = req.prompt
    else:
        message.token_ids.ids.extend(req.prompt)
    return message


def _finish(rec: RequestRecord, chunk: pb.GenerateResponse) -> None:
    rec.output_len = chunk.usage.completion_tokens
    rec.prompt_len = chunk.usage.prompt_tokens or rec.prompt_len
    if chunk.finish_reason == "abort":
        rec.fail("ABORTED", chunk.error or "the server aborted the request")
    elif rec.ttft == 0.0:
        rec.fail("NO_TOKENS", "the stream ended without any output")
    else:
        rec.success = True
