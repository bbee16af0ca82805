"""Floods the gateway with concurrent chat completions, from a process of its own so that the test
measures the gateway and its backend rather than a client sharing their interpreter.

    python http_flood_client.py BASE_URL CALLS ROUNDS MAX_TOKENS

Plain HTTP/1.1 on asyncio streams (the cheapest client Python has). Each round first opens CALLS
keep-alive connections, as a client's pool would hold them, then writes one request on each at once
and reads every answer; the rounds run one after another. Prints one JSON line per round: a list of
``[status, sent, ended, completion_tokens, error_type]`` per request, ``sent`` taken just before its
bytes are written and ``ended`` when its whole answer has been read, on this process's monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

FILLER = "abc " * 150


def request_bytes(host: str, text: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": "loraplex-demo", "messages": [{"role": "user", "content": text}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes) -> list[object]:
    reader, writer = conn
    sent = time.monotonic()
    writer.write(data)
    status, body = await read_answer(reader)
    ended = time.monotonic()
    writer.close()
    parsed = json.loads(body) if body else {}
    tokens = parsed.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
    error = parsed.get("error", {}).get("type", "") if status != 200 else parsed["choices"][0]["finish_reason"]
    return [status, sent, ended, tokens, error]


async def main(base_url: str, calls: int, rounds: int, max_tokens: int) -> None:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    warm = await asyncio.open_connection(host, port)
    print(json.dumps([await one(warm, request_bytes(url.netloc, "warm up", 2))]), file=sys.stderr)
    for r in range(rounds):
        conns = await asyncio.gather(*[asyncio.open_connection(host, port) for _ in range(calls)])
        await asyncio.sleep(0.2)  # the gateway has taken every connection in
        data = [request_bytes(url.netloc, f"flood {r} {i} {FILLER}", max_tokens) for i in range(calls)]
        results = await asyncio.gather(*[one(conn, d) for conn, d in zip(conns, data, strict=True)])
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
