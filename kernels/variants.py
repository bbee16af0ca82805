"""How many kernel binaries Triton has compiled: serving must compile none after start-up."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def count_compiled(kernels: Iterable[Any]) -> int:
    """Binaries compiled so far in this process for these ``@triton.jit`` functions, over every
    device (0 under ``TRITON_INTERPRET=1``, which compiles nothing)."""
    total = 0
    for kernel in kernels:
        for cache in getattr(kernel, "device_caches", {}).values():
            total += len(cache[0])
    return total
