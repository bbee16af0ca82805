"""A step's outputs as they cross from the core process to the front end: one row of plain values
per delta, so that pickling a step's message costs a fraction of pickling its dataclasses
(32 deltas: about half in the core, a quarter in the front end before the rows become
``RequestOutput``s again). Failures stay objects (rare; they carry an exception).
"""

from __future__ import annotations

from typing import Any, TypeAlias

from loraplex.backend.engine.engine_core import Emitted, RequestFailure
from loraplex.backend.outputs import RequestOutput, RequestTimings, Usage

Row: TypeAlias = tuple[Any, ...]


def encode(out: RequestOutput) -> Row:
    u, t = out.usage, out.timings
    return (out.request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason, out.stop_reason,
            out.new_logprobs, out.prompt_logprobs, u.prompt_tokens, u.completion_tokens, u.cached_tokens,
            t.arrival, t.first_scheduled, t.first_token, t.last_token, t.finished, out.adapter, out.adapter_version,
            out.error)


def decode(r: Row) -> RequestOutput:
    return RequestOutput(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], Usage(r[8], r[9], r[10]),
                         RequestTimings(r[11], r[12], r[13], r[14], r[15]), r[16], r[17], r[18])


def encode_items(items: list[Emitted]) -> list[Row | RequestFailure]:
    return [encode(i) if isinstance(i, RequestOutput) else i for i in items]


def decode_items(rows: list[Row | RequestFailure]) -> list[Emitted]:
    return [r if isinstance(r, RequestFailure) else decode(r) for r in rows]
