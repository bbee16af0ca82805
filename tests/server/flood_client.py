"""Floods a server with concurrent Generate calls, from a process of its own so that the test measures
the server rather than a client sharing its interpreter.

    python flood_client.py TARGET CALLS ROUNDS MAX_TOKENS [MODE]

After one call run to its end (the channel connected), each round sends CALLS chat calls at once
(long, ignore_eos prompts) and waits for every one to end; the rounds run one after another. MODE
says what becomes of the admitted calls: "end" (the default) reads them to their end, "cancel"
cancels each after its first message, "vanish" exits the process without a word once some calls
stream and no call has changed for 0.3 s (the connection just drops, with running and waiting calls
open; reported as "STREAMING" and "WAITING"; only round 0 runs). Prints
one JSON line per round: a list of ``[code, sent, ended, tokens, finish_reason]`` per call, ``code``
"OK" or a status name, ``sent`` taken just before the call is made (so a call's time includes any
wait of its own in this client before its bytes go out) and ``ended`` when its stream or its error
has been read, both on this process's monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import grpc

from loraplex.clients import pb
from loraplex.clients.v1 import inference_pb2_grpc as pb_grpc

FILLER = "abc " * 150  # a prompt that takes a while to render and tokenize: the window the old bound leaked in


def request(text: str, max_tokens: int) -> pb.GenerateRequest:
    params = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(params=params, chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]))


async def one(stub: pb_grpc.InferenceServiceStub, req: pb.GenerateRequest, mode: str) -> list[object]:
    sent = time.monotonic()
    call = stub.Generate(req, timeout=300)
    tokens, reason = 0, ""
    try:
        async for chunk in call:
            tokens += len(chunk.token_ids)
            reason = chunk.finish_reason or reason
            if mode == "cancel":
                call.cancel()
                return ["CANCELLED_BY_CLIENT", sent, time.monotonic(), tokens, reason]
            if mode == "vanish":
                return ["STREAMING", sent, time.monotonic(), tokens, reason]
        return ["OK", sent, time.monotonic(), tokens, reason]
    except grpc.aio.AioRpcError as err:
        return [err.code().name, sent, time.monotonic(), tokens, err.details() or ""]


async def until_quiet(tasks: list[asyncio.Future[list[object]]]) -> list[list[object]]:
    """Every call's row once some stream and none changed for 0.3 s; "WAITING" for calls still open."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=0.3, return_when=asyncio.FIRST_COMPLETED)
        if not done and any(t.result()[0] == "STREAMING" for t in tasks if t.done()):
            break
    return [t.result() if t.done() else ["WAITING", 0.0, time.monotonic(), 0, ""] for t in tasks]


async def main(target: str, calls: int, rounds: int, max_tokens: int, mode: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.InferenceServiceStub(channel)
    async for _ in stub.Generate(request("warm up", 2), timeout=120):
        pass
    for r in range(rounds):
        reqs = [request(f"flood {r} {i} {FILLER}", max_tokens) for i in range(calls)]
        if mode == "vanish":
            print(json.dumps(await until_quiet([asyncio.ensure_future(one(stub, req, mode)) for req in reqs])),
                  flush=True)
            os._exit(0)  # no cancel, no goodbye: the admitted streams are still open
        results = await asyncio.gather(*[one(stub, req, mode) for req in reqs])
        print(json.dumps(results), flush=True)
    await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                     sys.argv[5] if len(sys.argv) > 5 else "end"))
