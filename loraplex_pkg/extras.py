"""The optional extras of a client-only install, and the error that names the one to install.

A client-only install (no extra) has the gRPC client and the client commands of the CLI;
``loraplex serve`` and the offline ``LLM`` need ``[server]``, ``loraplex gateway`` needs
``[gateway]``. Each says so instead of showing a raw ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

# The top-level third-party modules each extra brings (tests/test_imports_declared.py checks
# every import of the package against pyproject.toml).
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "server": frozenset({"torch", "transformers", "safetensors", "huggingface_hub", "tokenizers", "jinja2",
                         "prometheus_client", "opentelemetry"}),
    "gateway": frozenset({"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "opentelemetry"}),
}


class MissingExtraError(ModuleNotFoundError):
    """A feature was used whose optional extra is not installed."""


def missing_extra(exc: ModuleNotFoundError, extra: str, feature: str) -> MissingExtraError | None:
    """``exc`` re-said as "``feature`` needs ``[extra]``" when the missing module is one that ``extra``
    installs; None for any other missing module (a real bug, to be raised as it is)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRA_MODULES[extra]:
        return None
    return MissingExtraError(
        f"{feature} needs the '{extra}' extra, which is not installed (no module named {top!r}): "
        f"pip install 'loraplex[{extra}]' (from a checkout: pip install '.[{extra}]')", name=exc.name)
