"""A tensor-parallel worker process: one rank of the model, driven by the engine's executor.

Start-up: join the process group, load the checkpoint on the host, shard it, move the shard to
the rank's device, and report how many KV blocks fit; the executor answers with the common block
count (the smallest over the ranks), then the worker builds its LoRA slots and its ``ModelRunner``
and says ready. Each step message holds the adapter slot operations queued since the last step
(applied first, on every rank in the same order: a hot swap takes effect at the same step
boundary everywhere) and the runner's part of the ``SchedulerOutput``; every rank runs it, rank 0
sends the sampled result back. Any error is reported and ends the process; the executor notices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from loraplex.backend.distributed import comm
from loraplex.backend.distributed.shard import ShardPlan, shard_lora, shard_model
from loraplex.config import EngineConfig

log = logging.getLogger(__name__)


def worker_device(config: EngineConfig, rank: int) -> torch.device:
    from loraplex.backend.engine.setup import resolve_device

    device = resolve_device(config.model.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def run_worker(rank: int, world_size: int, init_method: str, config: EngineConfig, conn: Connection) -> None:
    """The worker process's main."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine stops its workers itself
    try:
        _serve(rank, world_size, init_method, config, conn)
    except EOFError:  # the engine went away
        pass
    except BaseException as exc:
        log.exception("tensor-parallel worker %d failed", rank)
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(("error", rank, f"{exc!r}\n{traceback.format_exc()}")))
        os._exit(1)  # skip the process group's teardown: peers may be gone
    finally:
        conn.close()


def _serve(rank: int, world_size: int, init_method: str, config: EngineConfig, conn: Connection) -> None:
    from loraplex.backend.engine.runner import ModelRunner
    from loraplex.backend.engine.setup import kv_capacity, resolve_dtype
    from loraplex.backend.models.loader import load_model, resolve_model_path

    device = worker_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.model.dtype, device)
    torch.manual_seed(config.model.seed)
    comm.init(rank, world_size, init_method, device, config.stuck_step_seconds)
    mc = config.model
    if mc.model is None:
        from loraplex.backend.demo import DEMO_MODEL_DIR

        path = DEMO_MODEL_DIR
    else:
        path = resolve_model_path(mc.model, mc.revision)
    loaded = load_model(path, dtype, torch.device("cpu"))  # the whole checkpoint on the host, then this shard
    plan = ShardPlan.build(loaded.model.spec, rank, world_size)
    model = shard_model(loaded.model, plan)
    rope_cos, rope_sin = model.rope.cos, model.rope.sin
    model = model.to(device)
    model.rope.cos, model.rope.sin = rope_cos.to(device), rope_sin.to(device)
    conn.send_bytes(pickle.dumps(("blocks", rank, kv_capacity(config, model, dtype, device, 0))))
    kind, num_blocks, max_model_len = pickle.loads(conn.recv_bytes())
    assert kind == "init"
    slots = _build_slots(config, model, dtype, device) if config.lora.enable_lora else None
    runner = ModelRunner(model, num_blocks, config.cache.block_size, dtype, device, mc.seed,
                         cuda_graphs=not mc.enforce_eager, max_model_len=max_model_len,
                         max_num_seqs=config.scheduler.max_num_seqs, with_lora=slots is not None)
    conn.send_bytes(pickle.dumps(("ready", rank, None)))
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg[0] == "stop":
            comm.destroy()
            return
        _, ops, sched = msg
        _apply_slot_ops(slots, ops, plan)
        result = runner.launch(sched).result()  # every rank appends the token to its own request table
        if rank == 0:
            conn.send_bytes(pickle.dumps(("result", rank, result), protocol=pickle.HIGHEST_PROTOCOL))


def _build_slots(config: EngineConfig, model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """This rank's LoRA slots: the targets of its (sharded) layers, attached to them."""
    from loraplex.lora.slots import LoRASlots, LoRATarget

    shapes = model.spec.module_shapes()  # the local spec: sharded in/out features
    linears = model.lora_linears()
    targets = [LoRATarget(layer, group, modules, shapes[modules[0]][0], tuple(shapes[m][1] for m in modules))
               for layer, group, modules, _ in linears]
    slots = LoRASlots(targets, config.lora.max_loras, config.lora.max_lora_rank, dtype, device)
    for (*_, linear), target in zip(linears, targets, strict=True):
        lora_a, lora_b = slots.buffers(target.layer, target.group)
        linear.set_lora(lora_a, lora_b, slots.scales)
    return slots


def _apply_slot_ops(slots: Any, ops: list[tuple[Any, ...]], plan: ShardPlan) -> None:
    for op in ops:
        if op[0] == "load":
            slots.load(op[1], shard_lora(op[2], plan))
        else:
            slots.clear(op[1])
