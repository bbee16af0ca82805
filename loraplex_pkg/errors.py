"""Every error a user can see, in one place.

Each class carries ``status``: the gRPC status code name that the servicer's one
error mapper uses (the gateway maps those to HTTP). The engine raises these and
never imports grpc.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every user-facing error."""

    status = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(LoraplexError, ValueError):
    """A request field is out of range or malformed; ``field`` names it."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ConfigError(LoraplexError, ValueError):
    """A configuration value is invalid; the message names it and its value."""

    status = "INVALID_ARGUMENT"


class UnsupportedModelError(LoraplexError, ValueError):
    status = "INVALID_ARGUMENT"


class AdapterNotFoundError(LoraplexError, KeyError):
    status = "NOT_FOUND"

    def __init__(self, name: str):
        super().__init__(f"adapter '{name}' is not registered")
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class AdapterExistsError(LoraplexError):
    status = "ALREADY_EXISTS"

    def __init__(self, name: str):
        super().__init__(f"adapter '{name}' is already loaded; pass replace=true to load a new version")
        self.name = name


class AdapterLoadError(LoraplexError):
    """The adapter's files are refused (bad config, unsupported feature, shapes, size, format)."""

    status = "INVALID_ARGUMENT"

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter '{name}': {reason}")
        self.name = name
        self.reason = reason


class AdapterSourceForbiddenError(AdapterLoadError):
    """The adapter's path resolves outside the allowed roots."""

    status = "PERMISSION_DENIED"


class QueueFullError(LoraplexError):
    status = "RESOURCE_EXHAUSTED"


class NoAdapterSlotError(LoraplexError):
    status = "RESOURCE_EXHAUSTED"


class EngineDrainingError(LoraplexError):
    status = "UNAVAILABLE"

    def __init__(self, message: str = "server is shutting down; not accepting new requests"):
        super().__init__(message)


class EngineDeadError(LoraplexError):
    status = "UNAVAILABLE"

    def __init__(self, message: str = "engine loop is not running"):
        super().__init__(message)
