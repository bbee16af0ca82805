"""Server-sent events as OpenAI sends them: ``data: <json>\\n\\n`` … ``data: [DONE]\\n\\n``.

An error after the stream began is one ``data: {"error": {...}}`` event (the OpenAI SDKs
raise ``APIError`` from it), followed by ``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from loraplex.gateway.errors import OpenAIError

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


def error_event(err: OpenAIError) -> str:
    return event(err.body())
