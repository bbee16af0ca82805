"""Tensor parallelism: one engine (scheduler, KV-block accounting, adapter registry) driving N
worker processes that each run the same ``ModelRunner`` over their shard of the model.

- ``comm``: the process group of a worker and its collectives (gloo on CPU, NCCL on CUDA).
- ``shard``: gpt-fast-style sharding of a loaded ``DecoderModel`` and of LoRA weights to match.
- ``worker``: a worker process's main (load, shard, run steps, reply from rank 0).
- ``executor``: the engine side: spawns the workers, broadcasts each step, watches them.
"""
