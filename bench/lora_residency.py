"""Adapter residency cases of ``bench/engine_throughput.py``: thousands of adapters, and loads under traffic.

  lora_many   Qwen3-0.6B shape, N registered rank-16 adapters (default 1000), 512 requests of 128 in /
              128 out drawn Zipf(alpha=1) over them, max_loras 64, against the same run over only 64
              adapters, all resident; tok/s ratio, slot and CPU-cache hit rates, loads, evictions,
              overdue admissions. The N adapters share ``--many-files`` distinct weight files (symlinks;
              every adapter is still its own version, slot and host copy).
  lora_loads  Llama-3-8B shape, 32 streams (128-token prompts) decoding on 8 resident adapters while 50
              new rank-16 adapters, registered but only on disk, each get one request, one after the
              other; p50 / p90 from that request to its first token, and the streams' p99 inter-token
              latency against the same streams alone and with the same 50 requests on resident adapters.

Both drive the offline engine (``LLM``); ``tiny=True`` runs them on CPU at toy sizes (no figures).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clone_adapters(template: Path, root: Path, names: list[str], distinct: int, device: str) -> list[Path]:
    """``root/<name>`` PEFT adapter directories like ``template`` (same config, keys and shapes), over
    ``distinct`` weight files of fresh random values, linked round-robin."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(template / "adapter_model.safetensors"))
    files = root / "_weights"
    files.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(7)
    for i in range(distinct):
        fresh = {k: (torch.randn(t.shape, generator=g, device=device) * t.float().std()).to(t.dtype)
                 for k, t in tensors.items()}
        save_file(fresh, str(files / f"w{i}.safetensors"), metadata={"format": "pt"})
    dirs = []
    for i, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / "adapter_config.json", d / "adapter_config.json")
        (d / "adapter_model.safetensors").symlink_to(files / f"w{i % distinct}.safetensors")
        dirs.append(d)
    return dirs


def zipf_draw(n: int, k: int, alpha: float = 1.0, seed: int = 0) -> list[int]:
    """``k`` indices in [0, n) with P(i) proportional to 1 / (i + 1) ** alpha."""
    rng = random.Random(seed)
    return rng.choices(range(n), weights=[1 / (i + 1) ** alpha for i in range(n)], k=k)


def adapter_deltas(before: Any, after: Any) -> dict:
    """Hit rates and load counts between two ``EngineStats`` snapshots."""
    lookups = after.adapter_slot_lookups - before.adapter_slot_lookups
    slot_hits = after.adapter_slot_hits - before.adapter_slot_hits
    cpu_lookups = after.adapter_cpu_lookups - before.adapter_cpu_lookups
    cpu_hits = after.adapter_cpu_hits - before.adapter_cpu_hits
    return {"slot_hit_rate": round(slot_hits / lookups, 4) if lookups else None,
            "cpu_cache_hit_rate": round(cpu_hits / cpu_lookups, 4) if cpu_lookups else None,
            "slot_misses": lookups - slot_hits, "source_loads": after.adapter_source_loads - before.adapter_source_loads,
            "slot_evictions": after.adapter_slot_evictions - before.adapter_slot_evictions,
            "admissions_overdue": after.adapter_admissions_overdue - before.adapter_admissions_overdue,
            "steps": after.num_steps - before.num_steps}


def many_run(model: Path, root: Path, dirs: list[Path], n: int, p: dict) -> dict:
    """One lora_many run: ``n`` adapters registered, requests drawn Zipf(1) over them."""
    from loraplex import LLM, SamplingParams

    llm = LLM(str(model), dtype=p["dtype"], max_lora_rank=16, max_loras=p["max_loras"], max_cpu_loras=p["cpu"] or n,
              max_num_seqs=p["seqs"], max_model_len=p["prompt"] + p["gen"] + 16, adapter_roots=[str(root)])
    reg = llm.engine.adapters
    t = time.perf_counter()
    for i in range(n):
        reg.register(f"m{i}", str(dirs[i]))
    register_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 250, (p["prompt"],), generator=g).tolist() for _ in range(p["requests"])]
    params = SamplingParams(temperature=0.0, max_tokens=p["gen"], min_tokens=p["gen"], ignore_eos=True)
    head = [f"m{i}" for i in range(min(n, p["max_loras"]))]  # warm-up: the graphs, and the Zipf head in the slots
    llm.generate([prompts[0]] * len(head), SamplingParams(temperature=0.0, max_tokens=2), adapters=head)
    names = [f"m{i}" for i in zipf_draw(n, p["requests"])]
    llm.engine.publish_stats()
    before = llm.engine.snapshot
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, adapters=names)
    sync()
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == p["gen"] for o in outs)
    llm.engine.publish_stats()
    res = {"adapters": n, "distinct_drawn": len(set(names)), "requests": p["requests"], "prompt": p["prompt"],
           "gen": p["gen"], "tok_s": round(p["requests"] * p["gen"] / dt, 1), "seconds": round(dt, 3),
           "max_cpu_loras": p["cpu"] or n, "register_s": round(register_s, 2),
           **adapter_deltas(before, llm.engine.snapshot)}
    del llm, reg
    free_device()
    return res


def lora_many(model: Path, template: Path, root: Path, tiny: bool, n: int = 1000, distinct: int = 200,
              cpu_loras: int = 0) -> dict:
    """The lora_many case; ``cpu_loras`` 0 = a host cache as large as the adapter count."""
    p = dict(dtype="float32" if tiny else "bfloat16", max_loras=4 if tiny else 64, seqs=8 if tiny else 64,
             requests=32 if tiny else 512, prompt=8 if tiny else 128, gen=8 if tiny else 128, cpu=cpu_loras)
    n = 40 if tiny else n
    dirs = clone_adapters(template, root / "many", [f"m{i}" for i in range(n)], 8 if tiny else distinct,
                          "cpu" if tiny else "cuda")
    res = {"resident": many_run(model, root, dirs, p["max_loras"], p), "many": many_run(model, root, dirs, n, p)}
    res["many_vs_resident"] = round(res["many"]["tok_s"] / res["resident"]["tok_s"], 3)
    res["distinct_weight_files"] = 8 if tiny else distinct
    return res


class Streams:
    """Drives the engine: long-running streams plus one-off requests, timing every output."""

    def __init__(self, llm: Any, prompt: int, gen: int, seed: int):
        self.engine, self.prompt, self.seed = llm.engine, prompt, seed
        self.last: dict[str, float] = {}
        self.itl: list[float] = []  # the streams' inter-token latencies
        self.first: dict[str, float] = {}  # one-off request -> time of its first token
        self.gen = gen

    def start(self, n: int, adapters: list[str]) -> list[str]:
        from loraplex.backend.engine.request import EngineRequest

        g = torch.Generator().manual_seed(self.seed)
        rids = [f"s{self.seed}-{i}" for i in range(n)]
        for i, rid in enumerate(rids):
            self.engine.add_request(EngineRequest(rid, prompt_token_ids=self.prompt_ids(g), params=self.params(self.gen),
                                                  adapter=adapters[i % len(adapters)]))
        self.streams = set(rids)
        while any(rid not in self.last for rid in rids):  # every stream past its prefill
            self.step()
        self.itl.clear()
        return rids

    def prompt_ids(self, g: torch.Generator) -> list[int]:
        return torch.randint(1, 250, (self.prompt,), generator=g).tolist()

    @staticmethod
    def params(n: int) -> Any:
        from loraplex import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    def step(self) -> None:
        outs = self.engine.step()
        now = time.perf_counter()
        for out in outs:
            rid = out.request_id
            if not out.new_token_ids:
                continue
            if rid in self.streams:
                if rid in self.last:
                    self.itl += [(now - self.last[rid]) / len(out.new_token_ids)] * len(out.new_token_ids)
                self.last[rid] = now
            else:
                self.first.setdefault(rid, now)

    def one_offs(self, adapters: list[str], gen: int) -> list[float]:
        """One request per adapter, each sent when the one before has its first token; their times
        from arrival to first token."""
        from loraplex.backend.engine.request import EngineRequest

        g = torch.Generator().manual_seed(self.seed + 1)
        waits = []
        for i, name in enumerate(adapters):
            rid = f"o{self.seed}-{i}"
            sent = time.perf_counter()
            self.engine.add_request(EngineRequest(rid, prompt_token_ids=self.prompt_ids(g), params=self.params(gen),
                                                  adapter=name))
            while rid not in self.first:
                self.step()
            waits.append(self.first[rid] - sent)
        return waits

    def stop(self) -> None:
        for rid in self.streams:
            self.engine.abort(rid)
        while self.engine.has_unfinished():
            self.engine.step()


def percentiles(xs: list[float], *qs: float) -> dict:
    return {f"p{q:g}_ms": round(1000 * float(np.percentile(xs, q)), 3) for q in qs} if xs else {}


def lora_loads(model: Path, template: Path, root: Path, tiny: bool, loads: int = 50) -> dict:
    """The lora_loads case (see the module docstring)."""
    from loraplex import LLM

    streams, loads = (4, 3) if tiny else (32, loads)
    gen = 200 if tiny else 3000
    prompt = 8 if tiny else 128
    new = [f"n{i}" for i in range(loads)]
    resident = [f"r{i}" for i in range(8)]
    dirs = clone_adapters(template, root / "loads", new + resident, len(new) + len(resident), "cpu" if tiny else "cuda")
    llm = LLM(str(model), dtype="float32" if tiny else "bfloat16", max_lora_rank=16, max_loras=16, max_cpu_loras=8,
              max_num_seqs=streams + 8, max_model_len=prompt + gen + 32, adapter_roots=[str(root)])
    reg = llm.engine.adapters
    for name, path in zip(new + resident, dirs, strict=True):  # the new ones leave host memory: on disk only
        reg.register(name, str(path))
    warm = Streams(llm, prompt, gen, seed=0)  # graphs, allocator, the resident adapters in their slots
    warm.start(streams, resident)
    for _ in range(8):
        warm.step()
    warm.one_offs(resident[:2], 2)
    warm.stop()
    llm.engine.publish_stats()
    before = llm.engine.snapshot
    with_loads = Streams(llm, prompt, gen, seed=1)
    with_loads.start(streams, resident)
    steps0 = llm.engine.stats.num_steps
    waits = with_loads.one_offs(new, 4)
    steps = llm.engine.stats.num_steps - steps0
    with_loads.stop()
    llm.engine.publish_stats()
    after = llm.engine.snapshot
    alone = Streams(llm, prompt, gen, seed=2)
    alone.start(streams, resident)
    for _ in range(steps):
        alone.step()
    alone.stop()
    on_resident = Streams(llm, prompt, gen, seed=3)
    on_resident.start(streams, resident)
    resident_waits = on_resident.one_offs([resident[i % 8] for i in range(loads)], 4)
    on_resident.stop()
    p99 = {k: percentiles(s.itl, 50, 99) for k, s in (("alone", alone), ("loads", with_loads),
                                                       ("resident", on_resident))}
    del llm, reg, warm, with_loads, alone, on_resident
    free_device()
    res = {"streams": streams, "loads": loads, "steps": steps, "load_to_first_token": percentiles(waits, 50, 90, 100),
           "resident_request_to_first_token": percentiles(resident_waits, 50, 90),
           "stream_itl": p99, **adapter_deltas(before, after)}
    if p99["alone"] and p99["loads"]:
        res["itl_p99_loads_vs_alone"] = round(p99["loads"]["p99_ms"] / p99["alone"]["p99_ms"], 3)
        res["itl_p99_loads_vs_resident"] = round(p99["loads"]["p99_ms"] / p99["resident"]["p99_ms"], 3)
    return res


def free_device() -> None:
    """Collects the dropped engine (its objects were frozen out of the cyclic GC) and its GPU memory."""
    import gc

    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
