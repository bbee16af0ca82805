"""``pb.StructuredOutput`` → ``StructuredOutputsParams`` (errors name the proto's fields)."""

from __future__ import annotations

from typing import Any

from loraplex.backend.sampling_params import StructuredOutputsParams
from loraplex.clients.v1 import inference_pb2 as pb

FIELD_PREFIX = "params.structured_output"
# engine name -> proto name, so that errors name the field the caller set
PROTO_NAMES = {"json": "json_schema", "choice": "choice.values"}


def structured_from_pb(p: pb.SamplingParameters) -> StructuredOutputsParams | None:
    """None when the request is unconstrained; InvalidRequestError when the message is malformed."""
    if not p.HasField("structured_output"):
        return None
    so = p.structured_output
    kind = so.WhichOneof("kind")
    common: dict[str, Any] = {"field_prefix": FIELD_PREFIX, "field_names": PROTO_NAMES}
    if kind is None:
        return StructuredOutputsParams(**common)  # raises: "set exactly one of ..."
    if kind == "json_schema":
        return StructuredOutputsParams(json=so.json_schema, **common)
    if kind == "choice":
        return StructuredOutputsParams(choice=list(so.choice.values), **common)
    if kind == "json_object" and not so.json_object:
        return None  # json_object: false is the same as no constraint
    return StructuredOutputsParams(**{kind: getattr(so, kind)}, **common)
