"""The benchmark's HTTP side: the OpenAI-compatible gateway through ``httpx``, streaming completions or chat."""

from __future__ import annotations

import json
import ssl
import time
from typing import Any

from loraplex.clients.bench.errors import BenchError
from loraplex.clients.bench.grpc_endpoint import _PROBE_TOKEN, SamplingChoice, ServerFacts, vocab_from_error
from loraplex.clients.bench.records import RequestRecord
from loraplex.clients.bench.workload import BenchRequest


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise BenchError("an http:// endpoint needs httpx: pip install 'loraplex[bench]'") from exc
    return httpx


def _tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | bool:
    if not (ca or cert):
        return True
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


class HttpEndpoint:
    kind = "http"

    def __init__(self, base_url: str, api: str, token: str | None, tls_ca: str | None, tls_cert: str | None,
                 tls_key: str | None, timeout: float | None) -> None:
        httpx = _httpx()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                        verify=_tls(tls_ca, tls_cert, tls_key),
                                        timeout=httpx.Timeout(timeout, connect=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.api = api  # "completions" or "chat"
        self.model = ""

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self.client.request(method, path, json=body)
        except _httpx().HTTPError as exc:
            raise BenchError(f"{method} {str(self.client.base_url).rstrip('/')}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise BenchError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    async def describe(self, vocab_size: int | None) -> ServerFacts:
        cards = (await self._json("GET", "/models"))["data"]
        base = next((c for c in cards if not c.get("parent")), cards[0])
        self.model = base["id"]
        vocab = vocab_size or await self._probe_vocab()
        return ServerFacts(model=self.model, max_model_len=int(base.get("max_model_len") or 0), vocab_size=vocab)

    async def _probe_vocab(self) -> int:
        body = {"model": self.model, "prompt": [_PROBE_TOKEN], "max_tokens": 1}
        response = await self.client.post("/completions", json=body)
        if response.status_code == 200:
            raise BenchError("the server accepted an out-of-range token id; pass --vocab-size")
        return vocab_from_error(response.text)

    async def adapters(self) -> list[str]:
        cards = (await self._json("GET", "/models"))["data"]
        return sorted(c["id"] for c in cards if c.get("parent"))

    async def register(self, name: str, source: str) -> None:
        try:
            await self._json("POST", "/load_lora_adapter",
                             {"lora_name": name, "lora_path": source, "load_inplace": True})
        except BenchError as exc:
            raise BenchError(f"--register: loading {name!r} from {source!r}: {exc}") from None

    async def send(self, req: BenchRequest, sampling: SamplingChoice, rec: RequestRecord) -> None:
        path, body = self._payload(req, sampling)
        start = last = end = time.perf_counter()
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    rec.fail(f"HTTP_{response.status_code}", _error_message(response.text))
                    return
                async for line in response.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else ""
                    if not data or data == "[DONE]":
                        continue
                    event = json.loads(data)
                    now = time.perf_counter()
                    if "error" in event:
                        error = event["error"] or {}
                        rec.fail(f"STREAM_{error.get('code') or error.get('type') or 'error'}",
                                 str(error.get("message", "")))
                        return
                    end = now
                    if _carries_output(event):
                        if rec.ttft == 0.0:
                            rec.ttft = now - start
                        else:
                            rec.itl.append(now - last)
                        last = now
                    if event.get("usage"):
                        rec.output_len = int(event["usage"].get("completion_tokens") or 0)
                        rec.prompt_len = int(event["usage"].get("prompt_tokens") or rec.prompt_len)
            rec.latency = end - start
            if rec.ttft == 0.0:
                rec.fail("NO_TOKENS", "the stream ended without any output")
            else:
                rec.success = True
        except Exception as exc:  # a transport failure is a failed request, never a crash of the run
            rec.fail(type(exc).__name__, str(exc))

    def _payload(self, req: BenchRequest, sampling: SamplingChoice) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": req.adapter or self.model, "stream": True, "temperature": sampling.temperature,
                                "stream_options": {"include_usage": True}}
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
            if sampling.ignore_eos:
                body["min_tokens"] = req.max_tokens
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if self.api == "chat":
            if not isinstance(req.prompt, str):
                raise BenchError("--api chat needs text prompts")
            body["messages"] = [{"role": "user", "content": req.prompt}]
            return "/chat/completions", body
        body["prompt"] = req.prompt
        return "/completions", body

    async def close(self) -> None:
        await self.client.aclose()


def _carries_output(event: dict[str, Any]) -> bool:
    """A chunk with generated output: text, or a chat delta with content, reasoning or tool calls (not the
    role-only opening delta, nor the closing chunk that only carries finish_reason)."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
