"""Floods a server with concurrent Generate calls, from a process of its own so that the test measures
the server rather than a client sharing its interpreter.

    python flood_client.py TARGET CALLS ROUNDS MAX_TOKENS

After one call run to its end (the channel connected), each round sends CALLS chat calls at once
(long, ignore_eos prompts) and waits for every one to end; the rounds run one after another. Prints
one JSON line per round: a list of ``[code, sent, ended, tokens, finish_reason]`` per call, ``code``
"OK" or a status name, ``sent`` taken just before the call is made (so a call's time includes any
wait of its own in this client before its bytes go out) and ``ended`` when its stream or its error
has been read, both on this process's monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from loraplex.clients import pb
from loraplex.clients.v1 import inference_pb2_grpc as pb_grpc

FILLER = "abc " * 150  # a prompt that takes a while to render and tokenize: the window the old bound leaked in


def request(text: str, max_tokens: int) -> pb.GenerateRequest:
    params = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(params=params, chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]))


async def one(stub: pb_grpc.InferenceServiceStub, req: pb.GenerateRequest) -> list[object]:
    sent = time.monotonic()
    call = stub.Generate(req, timeout=300)
    tokens, reason = 0, ""
    try:
        async for chunk in call:
            tokens += len(chunk.token_ids)
            reason = chunk.finish_reason or reason
        return ["OK", sent, time.monotonic(), tokens, reason]
    except grpc.aio.AioRpcError as err:
        return [err.code().name, sent, time.monotonic(), tokens, err.details() or ""]


async def main(target: str, calls: int, rounds: int, max_tokens: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        async for _ in stub.Generate(request("warm up", 2), timeout=120):
            pass
        for r in range(rounds):
            reqs = [request(f"flood {r} {i} {FILLER}", max_tokens) for i in range(calls)]
            results = await asyncio.gather(*[one(stub, req) for req in reqs])
            print(json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
