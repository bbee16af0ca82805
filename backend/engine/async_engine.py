"""The asyncio face of the engine: what the gRPC servicer (and nothing else) calls.

CONTRACT (implemented by the engine owner; the servicer codes against it):

    engine = AsyncEngine(config: EngineConfig)        # builds model, tokenizer, registry
    await engine.start()                              # starts the step-loop thread
    await engine.shutdown()                           # stops it (after draining is the server's job)

    async for out in engine.generate(req: EngineRequest):   # out: RequestOutput deltas
        ...                                           # last one has finished=True
      - raises a LoraplexError subclass BEFORE the first yield for bad input
        (InvalidRequestError naming the field, AdapterNotFoundError, QueueFullError,
        EngineDrainingError, EngineDeadError)
      - if the consumer stops iterating (task cancelled / aclose), the request is
        aborted in the engine and its KV blocks and adapter pin are freed within one step
    await engine.abort(request_id)

    await engine.load_adapter(name, source, revision=None, replace=False, pinned=False) -> AdapterInfo
    await engine.unload_adapter(name) -> None
    engine.list_adapters() -> list[AdapterInfo]

    engine.tokenizer                                  # HF PreTrainedTokenizerFast
    engine.apply_chat_template(messages: list[dict], tools: list[dict] | None,
                               template_kwargs: dict | None) -> str
    engine.model_name: str; engine.max_model_len: int; engine.config: EngineConfig
    engine.is_healthy() -> bool                       # False if the loop died or a step is stuck
    engine.stats() -> EngineStats                     # see backend/engine/stats.py
    engine.start_draining()                           # new generate() calls raise EngineDrainingError
    engine.num_unfinished() -> int
"""
