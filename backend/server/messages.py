"""Every user-facing message the gRPC front end writes itself, in one place.

Engine errors carry their own messages (``loraplex.errors``); these are
the ones raised at the edge: protobuf shape, auth, server state.
"""

from __future__ import annotations

from enum import StrEnum


class Msg(StrEnum):
    MALFORMED_REQUEST = "malformed protobuf message: {error}"
    INPUT_MISSING = "exactly one of prompt, token_ids or chat must be set"
    EMPTY_PROMPT = "must not be empty"
    EMPTY_TOKEN_IDS = "must hold at least one token id"
    EMPTY_MESSAGES = "must hold at least one message"
    BAD_ROLE = "{role!r} is not one of {roles}"
    BAD_JSON = "not valid JSON: {error}"
    NOT_JSON_OBJECT = "must be a JSON object"
    RESERVED_KWARGS = "may not set {keys}: the server sets them (use add_generation_prompt, tools_json)"
    TEMPLATE_FAILED = "the chat template could not render these messages: {error}"
    REQUEST_ID_TOO_LONG = "at most {limit} characters, got {length}"
    REQUEST_ID_BAD_CHARS = "must be printable ASCII without spaces"
    ADAPTER_NAME_EMPTY = "must not be empty"
    ADAPTER_SOURCE_EMPTY = "must not be empty"
    AT_CAPACITY = "server is at capacity ({count} requests queued or running); retry later"
    DRAINING = "server is shutting down; not accepting new requests"
    UNAUTHENTICATED_MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
    UNAUTHENTICATED_WRONG = "invalid bearer token"
    INTERNAL = "internal server error in {method}; see the server log"
    TOKENIZE_INPUT_MISSING = "exactly one of prompt or chat must be set"
    REQUEST_ID_EMPTY = "must not be empty: give the id of the request to abort"
    MALFORMED_LOGGED = "malformed {kind} request ({error}); more of this kind within {period:.0f}s are not logged"
    JSON_TOO_DEEP = "nested deeper than {limit} levels"

    def format(self, *args: object, **kwargs: object) -> str:  # type: ignore[override]
        return self.value.format(*args, **kwargs)
