"""loraplex: one base LLM, many LoRA adapters, one GPU engine.

The offline API (``LLM``, ``SamplingParams``) needs the server extra (torch);
a client-only install uses ``loraplex.clients``.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from loraplex.backend.llm import LLM
    from loraplex.backend.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so that `import loraplex.clients` never imports torch.
    if name == "LLM":
        try:
            from loraplex.backend.llm import LLM
        except ModuleNotFoundError as exc:
            from loraplex.extras import missing_extra

            error = missing_extra(exc, "server", "loraplex.LLM")
            if error is None:
                raise
            raise error from None
        return LLM
    if name == "SamplingParams":
        from loraplex.backend.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
