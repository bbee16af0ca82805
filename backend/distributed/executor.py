"""The engine side of tensor parallelism (``tensor_parallel_size > 1``).

The engine process keeps what must live in one place: the scheduler, the KV-block accounting and
the adapter registry. Its registry writes into ``ShadowSlots``, which check and book-keep like
``LoRASlots`` but hold no weights: each slot load or clear is queued and shipped with the next
step, so every rank applies the same operations in the same order at the same step boundary.

``TPExecutor`` stands where the ``ModelRunner`` stands in a one-process engine (``launch(sched)``
-> a handle whose ``result()`` gives the ``StepResult``): it pickles the runner's part of each
``SchedulerOutput`` once, sends it to every worker over its pipe and reads the result from rank 0.
Every wait also watches the worker processes (their sentinels) and has a deadline
(``stuck_step_seconds``), so a worker that dies or hangs ends the step with ``WorkerDiedError``
naming it, never a hang; the executor then stops the other workers and stays dead.
``TPEngine`` turns that into the engine loop's death (health NOT_SERVING), even when idle.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from loraplex.backend.distributed.shard import check_divisible
from loraplex.backend.distributed.worker import run_worker
from loraplex.backend.engine.llm_engine import LLMEngine
from loraplex.backend.engine.runner import StepResult
from loraplex.backend.engine.scheduler import SchedulerOutput
from loraplex.backend.engine.sequence import Sequence
from loraplex.backend.engine.setup import (
    EngineParts,
    eos_token_ids,
    load_tokenizer,
    preload_adapters,
    register_demo_adapters,
    resolve_device,
    resolve_dtype,
)
from loraplex.backend.outputs import RequestOutput
from loraplex.config import EngineConfig
from loraplex.errors import ConfigError, InvalidRequestError, LoraplexError
from loraplex.lora.peft import BaseModelSpec, LoRAWeights
from loraplex.lora.slots import LoRASlots, LoRATarget

log = logging.getLogger(__name__)

START_TIMEOUT = 600.0  # seconds the workers may take to load and shard the model
STOP_TIMEOUT = 5.0


class WorkerDiedError(LoraplexError):
    """A tensor-parallel worker exited, failed or stopped answering; the engine cannot go on."""


class ShadowSlots(LoRASlots):
    """``LoRASlots`` without buffers: the same checks, ranks and scales; ``load``/``clear`` are queued
    (thread-safe) for the workers, which shard the adapter and write their own slots."""

    def __init__(self, targets: list[LoRATarget], max_loras: int, max_rank: int, dtype: torch.dtype):
        self.targets = list(targets)
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device("cpu")
        self._by_module = {(t.layer, m): (t, i) for t in self.targets for i, m in enumerate(t.modules)}
        self.scales = torch.zeros(max_loras, dtype=torch.float32)
        self.ranks = [0] * max_loras
        self._ops: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def buffers(self, layer: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("tensor parallelism: slot buffers live in the worker processes")

    @property
    def nbytes(self) -> int:
        return 0

    def load(self, slot: int, w: LoRAWeights) -> None:
        self.check(w)
        self._check_slot(slot)
        with self._lock:
            self._ops.append(("load", slot, w))
        self.scales[slot] = w.scale
        self.ranks[slot] = w.rank

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        with self._lock:
            self._ops.append(("clear", slot))
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    def take_ops(self) -> list[tuple[Any, ...]]:
        """The operations queued since the last call, in order."""
        with self._lock:
            ops, self._ops = self._ops, []
        return ops

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} out of range [0, {self.max_loras})")


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Lets a daemonic process (the engine-core process of ``loraplex serve``) start its workers; they
    are daemonic themselves and also leave when their pipe to the engine closes."""
    proc = multiprocessing.current_process()
    daemon = proc._config.get("daemon", False)  # type: ignore[attr-defined]
    proc._config["daemon"] = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        proc._config["daemon"] = daemon  # type: ignore[attr-defined]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class TPStepHandle:
    """A launched step; ``result()`` waits (watching the workers) for rank 0's reply."""

    overlappable = False  # the host processes each step's tokens before scheduling the next

    def __init__(self, executor: TPExecutor):
        self.executor = executor
        self._result: StepResult | None = None

    def complete(self) -> None:
        """Nothing to finish: structured outputs (the only deferred sampling) are refused under TP."""

    def result(self) -> StepResult:
        if self._result is None:
            self._result = self.executor._next_result()
        return self._result


class TPExecutor:
    """Starts ``world_size`` worker processes and drives them one step at a time."""

    graphs = None  # per-rank CUDA graphs live in the workers

    def __init__(self, config: EngineConfig, world_size: int, device: torch.device):
        self.config, self.world_size, self.device = config, world_size, device
        self.slots: ShadowSlots | None = None  # set once the registry is built
        self.dead: str | None = None
        self._timeout = config.stuck_step_seconds
        self._lock = threading.Lock()
        self._stopping = {"stopping": False}  # shared with the finalizer: the workers' exits are then expected
        self._unanswered = 0  # launched steps whose result was not read yet
        self._early: list[list[tuple[Any, ...]]] = [[] for _ in range(world_size)]  # read before their turn
        ctx = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="loraplex-tp-")
        init_method = Path(self._dir, "store").as_uri()
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        with _children_allowed():
            for rank in range(world_size):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=run_worker, args=(rank, world_size, init_method, config, child),
                                   name=f"loraplex-tp-worker-{rank}", daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns, self._dir, self._stopping)
        blocks = self._gather("blocks", START_TIMEOUT)
        self.num_blocks = min(blocks)  # KV blocks that fit on every rank

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, num_blocks: int, max_model_len: int) -> None:
        """Sizes every rank's KV cache, waits for the runners, then watches the workers."""
        self._broadcast(pickle.dumps(("init", num_blocks, max_model_len)))
        self._gather("ready", START_TIMEOUT)
        threading.Thread(target=_watch, args=(weakref.ref(self), [p.sentinel for p in self.procs], self._stopping),
                         name="loraplex-tp-watchdog", daemon=True).start()

    # ---- steps
    def launch(self, sched: SchedulerOutput, defer: bool = False) -> TPStepHandle:
        """Sends step ``sched`` to every rank; ``defer`` has nothing to defer here (see ``complete``)."""
        while self._unanswered:  # a handle dropped unread (a failed step): keep replies in step
            self._next_result()
        self._raise_if_dead()
        ops = self.slots.take_ops() if self.slots is not None else []
        step = SchedulerOutput(requests=sched.requests, finished_req_ids=sched.finished_req_ids)
        self._broadcast(pickle.dumps(("step", ops, step), protocol=pickle.HIGHEST_PROTOCOL))
        self._unanswered += 1
        return TPStepHandle(self)

    def execute(self, sched: SchedulerOutput) -> StepResult:
        return self.launch(sched).result()

    def _next_result(self) -> StepResult:
        msg = self._receive(0, self._timeout)
        self._unanswered -= 1
        if msg[0] != "result":
            self._fail(f"unexpected reply {msg[0]!r} from rank 0")
        result: StepResult = msg[2]
        return result

    # ---- messaging, every wait bounded and watching the processes
    def _broadcast(self, data: bytes) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                self._fail(f"could not reach rank {rank}: {exc!r}")

    def _gather(self, kind: str, timeout: float) -> list[Any]:
        out = []
        for rank in range(self.world_size):
            msg = self._receive(rank, timeout)
            if msg[0] != kind:
                self._fail(f"rank {rank} sent {msg[0]!r}, expected {kind!r}")
            out.append(msg[2])
        return out

    def _receive(self, rank: int, timeout: float) -> tuple[Any, ...]:
        """The next message from ``rank``; an error message from any rank, a process that exits or no
        message before ``timeout`` fails the executor."""
        if self._early[rank]:
            return self._early[rank].pop(0)
        deadline = time.monotonic() + timeout
        conn = self.conns[rank]
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while True:
            self._raise_if_dead()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"rank {rank} gave no answer within {timeout:.0f} s")
            ready = wait([*self.conns, *sentinels], min(remaining, 1.0))
            # messages first (a worker that failed sent its error before it exited), rank ``rank``'s first
            for item in sorted((c for c in ready if isinstance(c, Connection)), key=lambda c: c is not conn):
                try:
                    msg = pickle.loads(item.recv_bytes())
                except (EOFError, OSError):
                    self._fail(None)
                if msg[0] == "error":
                    self._fail(f"rank {msg[1]} failed: {msg[2].splitlines()[0]}", msg[2])
                if item is conn:
                    return tuple(msg)
                self._early[msg[1]].append(tuple(msg))  # read when its turn comes
            if any(not isinstance(item, Connection) for item in ready):
                self._fail(None)

    def _raise_if_dead(self) -> None:
        if self.dead is not None:
            raise WorkerDiedError(self.dead)

    def _fail(self, detail: str | None, trace: str | None = None) -> Any:
        """Marks the executor dead (naming every worker that exited), stops the rest, raises."""
        with self._lock:
            if self.dead is None:
                time.sleep(0.2)  # a peer's death usually makes the others fail too: let exit codes settle
                gone = [f"rank {r} (pid {p.pid}) {_exit_text(p.exitcode)}" for r, p in enumerate(self.procs)
                        if p.exitcode is not None]
                parts = ["tensor-parallel worker failure"] + gone + ([detail] if detail else [])
                self.dead = "; ".join(parts)
                log.error("%s%s", self.dead, f"\n{trace}" if trace else "")
        self._finalizer()
        raise WorkerDiedError(self.dead)

    def shutdown(self) -> None:
        self._finalizer()


def _watch(ref: weakref.ref[TPExecutor], sentinels: list[int], stopping: dict[str, bool]) -> None:
    """Notices a worker that exits between steps (an idle engine has no step to fail); holds the
    executor weakly, so a dropped engine still stops its workers."""
    wait(sentinels)
    executor = ref()
    if executor is not None and not stopping["stopping"] and executor.dead is None:
        with contextlib.suppress(WorkerDiedError):
            executor._fail(None)


def _stop_workers(procs: list[Any], conns: list[Connection], tmpdir: str, stopping: dict[str, bool]) -> None:
    stopping["stopping"] = True
    stop = pickle.dumps(("stop",))
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send_bytes(stop)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_TIMEOUT)
    for conn in conns:
        conn.close()
    shutil.rmtree(tmpdir, ignore_errors=True)


def build_tp_engine_parts(config: EngineConfig) -> EngineParts:
    """What ``build_engine_parts`` builds, for an engine whose model lives in worker processes: the
    spec (a meta-device model), tokenizer, the KV block count every rank can hold, the registry
    over ``ShadowSlots``, and the started ``TPExecutor`` as the runner."""
    from loraplex.backend.models.llama import ArchSpec, DecoderModel
    from loraplex.backend.models.loader import ARCHITECTURES, load_hf_config, resolve_model_path

    mc, n = config.model, config.tensor_parallel_size
    device = resolve_device(mc.device)
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise ConfigError(f"tensor_parallel_size={n}: only {torch.cuda.device_count()} CUDA devices are visible")
    dtype = resolve_dtype(mc.dtype, device)
    demo = mc.model is None
    if demo:
        from loraplex.backend.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

        path, model_name = Path(DEMO_MODEL_DIR), DEMO_MODEL_NAME
    else:
        assert mc.model is not None
        path, model_name = resolve_model_path(mc.model, mc.revision), mc.model
    hf_config, arch = load_hf_config(path)
    qk_norm, bias_default = ARCHITECTURES[arch]
    spec = ArchSpec.from_hf(hf_config, qk_norm=qk_norm, qkv_bias_default=bias_default)
    check_divisible(spec, n)
    with torch.device("meta"):
        model = DecoderModel(spec, hf_config)  # the spec and LoRA targets, no weights
    tokenizer = load_tokenizer(Path(mc.tokenizer) if mc.tokenizer else path)
    max_model_len = mc.max_model_len or spec.max_positions
    if max_model_len > spec.max_positions:
        raise ConfigError(f"max_model_len={max_model_len}: must be <= the model's max_position_embeddings="
                          f"{spec.max_positions}")
    executor = TPExecutor(config, n, device)
    try:
        num_blocks = executor.num_blocks
        capacity = num_blocks * config.cache.block_size
        if capacity < max_model_len:
            log.warning("max_model_len lowered from %d to the KV cache capacity of %d tokens", max_model_len,
                        capacity)
            max_model_len = capacity
        executor.start(num_blocks, max_model_len)
        adapters = None
        if config.lora.enable_lora:
            adapters = _build_registry(config, model, arch, model_name, dtype, executor)
            if demo:
                register_demo_adapters(adapters)
            preload_adapters(adapters, config.lora.preload)
    except BaseException:
        executor.shutdown()
        raise
    return EngineParts(model, model_name, tokenizer, device, dtype, max_model_len, num_blocks,
                       eos_token_ids(path, tokenizer), adapters, arch, runner=executor)


def _build_registry(config: EngineConfig, model: Any, arch: str, model_name: str, dtype: torch.dtype,
                    executor: TPExecutor) -> Any:
    from loraplex.backend.demo import DEMO_ADAPTERS
    from loraplex.lora.registry import AdapterRegistry

    shapes = model.spec.module_shapes()  # the whole model's: adapters are checked as they are on disk
    targets = [LoRATarget(layer, group, modules, shapes[modules[0]][0], tuple(shapes[m][1] for m in modules))
               for layer, group, modules, _ in model.lora_linears()]
    slots = ShadowSlots(targets, config.lora.max_loras, config.lora.max_lora_rank, dtype)
    executor.slots = slots
    base = BaseModelSpec(architecture=arch, model_name=model_name, num_layers=model.spec.num_layers,
                         module_shapes=shapes)
    demo_root = str(next(iter(DEMO_ADAPTERS.values())).parent)
    return AdapterRegistry(config.lora, base, slots, builtin_roots=(demo_root,))


class TPEngine(LLMEngine):
    """``LLMEngine`` over a ``TPExecutor``: a dead worker makes the loop step (even when idle) and the
    step raise ``WorkerDiedError``, so the engine loop fails the requests in flight and dies."""

    runner: TPExecutor  # type: ignore[assignment]

    def make_sequence(self, proc: Any, final_only: bool = False) -> Sequence:
        seq = super().make_sequence(proc, final_only)
        if seq.structured is not None:  # the grammar matcher lives in the engine process
            self.release_sequence(seq)
            raise InvalidRequestError("response_format", "structured outputs are not supported with "
                                                         "tensor_parallel_size > 1 yet")
        return seq

    def has_unfinished(self) -> bool:
        return super().has_unfinished() or self.runner.dead is not None

    def step(self) -> list[RequestOutput]:
        self.runner._raise_if_dead()
        return super().step()

    def shutdown(self) -> None:
        self.runner.shutdown()
