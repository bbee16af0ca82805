"""The adapter registry: versions, unload while in use, slot and host-memory LRU tiers, first use
from adapter_dir, and concurrent operations on one name."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from loraplex.config import LoRAConfig
from loraplex.errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    NoAdapterSlotError,
)
from loraplex.lora.peft import BaseModelSpec, LoRAWeights, load_peft_adapter
from loraplex.lora.registry import AdapterRegistry, AdapterVersion
from loraplex.lora.slots import LoRASlots, targets_from_spec
from loraplex.lora.types import AdapterState
from tests.lora_factory import TMP_ROOTS, make_peft_adapter

Factory = Callable[..., AdapterRegistry]


@pytest.fixture
def make_registry(base_spec: BaseModelSpec) -> Factory:
    def make(max_loras: int = 2, max_cpu_loras: int = 8, loader: Any = load_peft_adapter,
             **cfg: Any) -> AdapterRegistry:
        slots = LoRASlots(targets_from_spec(2, base_spec.module_shapes), max_loras=max_loras, max_rank=8)
        return AdapterRegistry(LoRAConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, **{"adapter_roots": TMP_ROOTS, **cfg}), base_spec,
                               slots, loader=loader)
    return make


def src(store: dict[str, Path], name: str) -> str:
    return str(store[name])


def slot_is_zero(reg: AdapterRegistry, slot: int) -> bool:
    return reg.slots.scales[slot] == 0 and all(
        not a[slot].any() and not b[slot].any() for a, b in (reg.slots.buffers(t.layer, t.group)
                                                             for t in reg.slots.targets))


def test_versions_on_reload(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry()
    info = reg.register("a", src(adapter_store, "qkv_r4"))
    assert (info.version, info.rank, info.state, info.target_modules) == (1, 4, AdapterState.CACHED,
                                                                          ("k_proj", "q_proj", "v_proj"))
    with pytest.raises(AdapterExistsError):
        reg.register("a", src(adapter_store, "mlp_r2"))
    v1 = reg.acquire("a")
    slot1 = reg.ensure_resident({v1})[v1]
    assert reg.register("a", src(adapter_store, "mlp_r2"), replace=True).version == 2
    v2 = reg.acquire("a")
    assert (v1.key, v2.key) == (("a", 1), ("a", 2)) and v1.unloaded and not v2.unloaded
    assert v1.weights is not None and v1.weights.rank == 4 and v2.weights is not None and v2.weights.rank == 2
    slots = reg.ensure_resident({v1, v2})  # the old version's request still runs on its own weights
    assert slots[v1] == slot1 and slots[v2] != slot1
    assert reg.counts().retired_versions == 1
    reg.release(v1)
    assert reg.slot_of(v1) is None and v1.weights is None and slot_is_zero(reg, slot1)
    reg.release(v2)
    assert reg.consistency_errors() == [] and reg.counts().retired_versions == 0


def test_unload_while_in_use_frees_slot_after_release(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry()
    reg.register("a", src(adapter_store, "qkv_r4"))
    v = reg.acquire("a")
    slot = reg.ensure_resident([v])[v]
    reg.unregister("a")
    assert reg.list() == []
    with pytest.raises(AdapterNotFoundError, match="adapter 'a' is not registered"):
        reg.acquire("a")
    with pytest.raises(AdapterNotFoundError):
        reg.unregister("a")
    assert reg.counts().lora_slots_used == 1 and reg.ensure_resident([v]) == {v: slot}  # still usable
    reg.release(v)
    counts = reg.counts()
    assert counts.lora_slots_used == 0 and counts.retired_versions == 0 and slot_is_zero(reg, slot)
    assert reg.register("a", src(adapter_store, "qkv_r4")).version == 2  # (name, version) never reused
    with pytest.raises(ValueError, match="released more often"):
        reg.release(v)
    assert reg.consistency_errors() == []


def test_slot_lru_never_evicts_in_use(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry(max_loras=2)
    for name in ("qkv_r4", "mlp_r2", "o_r3"):
        reg.register(name, src(adapter_store, name))
    a, b, c = (reg.acquire(n) for n in ("qkv_r4", "mlp_r2", "o_r3"))
    first = reg.ensure_resident([a, b])
    second = reg.ensure_resident([b, c])  # evicts a, the only one outside the step
    assert second[b] == first[b] and second[c] == first[a] and reg.slot_of(a) is None
    third = reg.ensure_resident([a, c])  # b is now the least recently used
    assert third[c] == second[c] and third[a] == first[b]
    with pytest.raises(NoAdapterSlotError, match="max_loras=2"):
        reg.ensure_resident([a, b, c])
    counts = reg.counts()
    assert (counts.slot_loads, counts.slot_evictions, counts.lora_slots_used) == (4, 2, 2)
    assert counts.slot_load_seconds > 0 and counts.running_by_adapter == {"qkv_r4": 1, "mlp_r2": 1, "o_r3": 1}
    assert {i.name: i.state for i in reg.list()} == {"qkv_r4": AdapterState.RESIDENT, "mlp_r2": AdapterState.CACHED,
                                                    "o_r3": AdapterState.RESIDENT}


def test_slot_victim_prefers_idle_versions(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry(max_loras=2)
    for name in ("qkv_r4", "mlp_r2", "o_r3"):
        reg.register(name, src(adapter_store, name))
    busy, idle = reg.acquire("qkv_r4"), reg.acquire("mlp_r2")
    slots = reg.ensure_resident([busy, idle])
    reg.release(idle)  # busy is least recently used but still has a running request
    new = reg.acquire("o_r3")
    assert reg.ensure_resident([new])[new] == slots[idle] and reg.slot_of(busy) == slots[busy]


def test_cpu_cache_lru_and_reload_from_source(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry(max_cpu_loras=2)
    reg.register("p", src(adapter_store, "o_r3"), pinned=True)
    reg.register("a", src(adapter_store, "qkv_r4"))
    held = reg.acquire("a")
    reg.register("b", src(adapter_store, "mlp_r2"))  # over the limit; p is pinned and a held: b goes
    reg.register("c", src(adapter_store, "all_r8_rs"))  # and so does c
    states = {i.name: i.state for i in reg.list()}
    assert states == {"p": AdapterState.CACHED, "a": AdapterState.CACHED, "b": AdapterState.REGISTERED,
                      "c": AdapterState.REGISTERED}
    loads = reg.counts().source_loads
    b = reg.acquire("b")  # reloaded from source
    expected = load_peft_adapter("b", src(adapter_store, "mlp_r2"), reg.base, reg.cfg)
    assert b.weights is not None and b.version == 1 and reg.counts().source_loads == loads + 1
    assert all(torch.equal(b.weights.weights[k][1], expected.weights[k][1]) for k in expected.weights)
    reg.release(b)
    reg.release(held)
    counts = reg.counts()
    assert counts.cpu_evictions >= 2 and counts.adapters_cached <= 2
    assert {i.name for i in reg.list() if i.state == AdapterState.CACHED} >= {"p"} and reg.consistency_errors() == []


def test_reload_refuses_changed_source(make_registry: Factory, copy_adapter: Any, tiny_model: PreTrainedModel,
                                       adapter_store: dict[str, Path]) -> None:
    reg = make_registry(max_cpu_loras=1)
    path = copy_adapter("qkv_r4")
    reg.register("a", str(path))
    reg.register("b", src(adapter_store, "mlp_r2"))  # evicts a from host memory
    make_peft_adapter(tiny_model, path, 4, 8.0, ["q_proj", "k_proj", "v_proj"], seed=99)
    with pytest.raises(AdapterLoadError, match="changed since version 1 was loaded"):
        reg.acquire("a")
    assert reg.get("a").running_requests == 0 and reg.get("a").state == AdapterState.REGISTERED
    reg.register("a", str(path), replace=True)
    assert reg.acquire("a").version == 2


def test_adapter_dir_load_on_first_use(make_registry: Factory, adapter_store: dict[str, Path],
                                       tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    shutil.copytree(adapter_store["qkv_r4"], tmp_path / "dir" / "sub1")
    shutil.copytree(adapter_store["qkv_r4"], tmp_path / "dir" / "broken")
    (tmp_path / "dir" / "broken" / "adapter_config.json").write_text("{")
    shutil.copytree(adapter_store["mlp_r2"], tmp_path / "elsewhere")
    reg = make_registry(max_cpu_loras=1, adapter_dir=str(tmp_path / "dir"),
                        adapter_roots=[str(tmp_path / "elsewhere")])
    reg.register("pinned", str(tmp_path / "elsewhere"), pinned=True)
    v = reg.acquire("sub1")  # adapter_dir is an allowed root for these loads
    assert reg.counts().source_loads == 2 and v.weights is not None  # read once, not evicted before use
    assert (v.key, v.refcount, reg.get("sub1").source) == (("sub1", 1), 1, str(tmp_path / "dir" / "sub1"))
    assert reg.acquire("sub1") is v and v.refcount == 2
    for missing in ("nope", "../dir/sub1", "sub1/..", ""):
        with pytest.raises(AdapterNotFoundError):
            reg.acquire(missing)
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        reg.acquire("broken")
    assert [i.name for i in reg.list()] == ["pinned", "sub1"]
    with pytest.raises(AdapterNotFoundError):
        make_registry().acquire("sub1")  # no adapter_dir: no loading by name


def test_failed_register_leaves_registry_unchanged(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    reg = make_registry()
    reg.register("a", src(adapter_store, "qkv_r4"))
    with pytest.raises(AdapterLoadError):
        reg.register("a", "/nonexistent/adapter", replace=True)
    with pytest.raises(AdapterLoadError, match="adapter name"):
        reg.register("bad name", src(adapter_store, "qkv_r4"))
    assert [(i.name, i.version) for i in reg.list()] == [("a", 1)] and reg.consistency_errors() == []


def serialised_loader() -> tuple[Callable[..., LoRAWeights], list[str]]:
    """A loader that records any overlap of two loads of one name."""
    active: dict[str, int] = {}
    lock, overlaps = threading.Lock(), []

    def loader(name: str, *args: Any) -> LoRAWeights:
        with lock:
            active[name] = active.get(name, 0) + 1
            if active[name] > 1:
                overlaps.append(name)
        try:
            time.sleep(0.002)
            return load_peft_adapter(name, *args)
        finally:
            with lock:
                active[name] -= 1
    return loader, overlaps


def client(reg: AdapterRegistry, sources: list[str], seed: int, seen: list[AdapterVersion],
           errors: list[BaseException]) -> None:
    """Random register / unregister / acquire+step+release on the name "hot"."""
    rnd = random.Random(seed)
    try:
        for _ in range(25):
            op = rnd.random()
            try:
                if op < 0.25:
                    reg.register("hot", rnd.choice(sources), replace=rnd.random() < 0.8)
                elif op < 0.4:
                    reg.unregister("hot")
                else:
                    v = reg.acquire("hot")
                    seen.append(v)
                    assert v.weights is not None
                    reg.ensure_resident([v])
                    reg.release(v)
            except (AdapterNotFoundError, AdapterExistsError):
                pass
    except BaseException as e:  # surfaced by the test
        errors.append(e)


def test_concurrent_operations_on_one_name(make_registry: Factory, adapter_store: dict[str, Path]) -> None:
    loader, overlaps = serialised_loader()
    reg = make_registry(max_loras=2, max_cpu_loras=2, loader=loader)
    sources = [src(adapter_store, n) for n in ("qkv_r4", "mlp_r2", "o_r3")]
    seen: list[AdapterVersion] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=client, args=(reg, sources, i, seen, errors)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and overlaps == [] and seen
    assert reg.consistency_errors() == []
    assert len({v.key for v in seen}) == len({id(v) for v in seen})  # one object per (name, version)
    counts = reg.counts()
    assert counts.retired_versions == 0 and counts.running_by_adapter == {}
    assert counts.lora_slots_used == counts.adapters_resident <= 1  # retired versions' slots were freed
    assert all(v.weights is None and reg.slot_of(v) is None for v in seen if v.unloaded)


def test_step_slots_reuse_the_last_map_until_a_slot_moves(make_registry: Factory,
                                                           adapter_store: dict[str, Path]) -> None:
    reg = make_registry(max_loras=2)
    for name in ("qkv_r4", "mlp_r2", "o_r3"):
        reg.register(name, src(adapter_store, name))
    a, b, c = (reg.acquire(n) for n in ("qkv_r4", "mlp_r2", "o_r3"))
    first = reg.step_slots({a, b})
    assert first == reg.ensure_resident([a, b])  # the same slots as the plain path
    assert reg.step_slots({a, b}) is first and reg.step_slots({b}) is first  # nothing moved: no work at all
    reg.release(b)  # b is idle now, so c may take its slot
    moved = reg.step_slots({a, c})
    assert moved is not first and moved[a] == first[a] and moved[c] == first[b] and reg.slot_of(b) is None
    assert reg.step_slots({a, c}) is moved
    reg.release(c)
    reg.unregister("o_r3")  # retired and unheld: its slot is freed, so the map is rebuilt
    again = reg.step_slots({a})
    assert again is not moved and again == {a: first[a]}
    reg.release(a)
    assert reg.consistency_errors() == []


def test_versions_count_as_used_when_their_requests_stop(make_registry: Factory,
                                                         adapter_store: dict[str, Path]) -> None:
    """step_slots does not touch the LRU every step: a version counts as used when its requests
    start and stop, so the one whose requests stopped first is the victim."""
    reg = make_registry(max_loras=2)
    for name in ("qkv_r4", "mlp_r2", "o_r3"):
        reg.register(name, src(adapter_store, name))
    a, b, c = (reg.acquire(n) for n in ("qkv_r4", "mlp_r2", "o_r3"))
    slot_a = reg.step_slots({a})[a]  # a placed first: the least recently used by placement
    step = reg.step_slots({b})
    slot_b = step[b]
    for v in (a, b):
        reg.set_active(v, 1)
    for _ in range(3):
        assert reg.step_slots({b}) is step
    reg.set_active(b, -1)  # b's requests stop first...
    reg.set_active(a, -1)  # ...then a's
    for v in (a, b):
        reg.release(v)
    assert reg.step_slots({c})[c] == slot_b and reg.slot_of(a) == slot_a
    reg.release(c)
    assert reg.consistency_errors() == []
