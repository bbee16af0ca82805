"""The offline API: ``from loraplex import LLM, SamplingParams``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence as Seq
from typing import Any

from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.request import EngineRequest
from loraplex.backend.outputs import CompletionOutput, Logprob, RequestOutput, Usage
from loraplex.backend.sampling_params import SamplingParams
from loraplex.config import EngineConfig
from loraplex.lora.types import AdapterInfo

Prompt = str | list[int]


class LLM:
    """One base model and its adapters, driven synchronously.

    ``LLM()`` with no model serves the built-in demo model with its adapters
    registered. Engine arguments use vLLM's names (``max_model_len``,
    ``max_num_seqs``, ``max_loras``, ...; see ``loraplex.config``).
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine.create(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 adapters: Seq[str | None] | str | None = None) -> list[CompletionOutput]:
        """Runs every prompt to completion in one continuous batch; results in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        n = len(prompt_list)
        param_list = _broadcast(params if params is not None else SamplingParams(), n, "params")
        adapter_list = _broadcast(adapters, n, "adapters")
        seqs = []
        try:
            for prompt, p, adapter in zip(prompt_list, param_list, adapter_list, strict=True):
                req = EngineRequest(f"llm-{next(self._ids)}", params=p, adapter=adapter,
                                    **({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}))
                seqs.append(self.engine.make_sequence(self.engine.input_processor.process(req), final_only=True))
        except BaseException:
            for seq in seqs:
                self.engine.release_sequence(seq)
            raise
        deltas: dict[str, list[RequestOutput]] = {s.request_id: [] for s in seqs}
        try:
            for seq in seqs:
                self.engine.add_sequence(seq)
            while any(s.request_id in self.engine.seqs for s in seqs):
                for out in self.engine.step():
                    deltas[out.request_id].append(out)
                for _rid, error in self.engine.take_failures():  # an adapter failed to load
                    raise error
        except BaseException:  # KeyboardInterrupt and timeouts too: leave the engine usable
            self._abort_all(seqs)
            raise
        return [_collect(s.request_id, s.prompt_token_ids, deltas[s.request_id]) for s in seqs]

    def _abort_all(self, seqs: list[Any]) -> None:
        for seq in seqs:
            if seq.request_id in self.engine.seqs:
                self.engine.abort(seq.request_id)
            else:
                self.engine.release_sequence(seq)  # never added (release is idempotent)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.engine.apply_chat_template(messages, **kwargs)

    def load_adapter(self, name: str, source: str | os.PathLike[str], revision: str | None = None,
                     replace: bool = False, pinned: bool = False) -> AdapterInfo:
        info = self._registry().register(name, os.fspath(source), revision=revision, replace=replace, pinned=pinned)
        self.engine.publish_stats()  # gauges follow the operation, not the next step
        return info

    def unload_adapter(self, name: str) -> None:
        self._registry().unregister(name)
        self.engine.publish_stats()

    def list_adapters(self) -> list[AdapterInfo]:
        return self._registry().list()

    def _registry(self) -> Any:
        if self.engine.adapters is None:
            from loraplex.errors import ConfigError

            raise ConfigError("enable_lora=False: adapters are disabled")
        return self.engine.adapters


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (str, SamplingParams)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        from loraplex.errors import InvalidRequestError

        raise InvalidRequestError(name, f"{len(values)} given for {n} prompts")
    return values


def _collect(request_id: str, prompt_ids: list[int], deltas: list[RequestOutput]) -> CompletionOutput:
    last = deltas[-1]
    logprobs: list[Logprob] | None = None
    if any(d.new_logprobs is not None for d in deltas):
        logprobs = [lp for d in deltas for lp in (d.new_logprobs or [])]
    prompt_lps = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
    return CompletionOutput(
        request_id=request_id, prompt_token_ids=prompt_ids, text="".join(d.new_text for d in deltas),
        token_ids=[t for d in deltas for t in d.new_token_ids], finish_reason=last.finish_reason,
        stop_reason=last.stop_reason, usage=last.usage or Usage(), logprobs=logprobs,
        prompt_logprobs=prompt_lps, adapter=last.adapter)
