"""The adapter registry: names -> immutable versions, over three tiers (GPU slot, host memory, source).

Thread-safe: one ``RLock`` guards all state and is never held during file I/O; a per-name lock
serialises ``register`` / ``unregister`` / first-use and reload-from-source of one name (always taken
before the main lock). The engine's step thread calls ``ensure_resident``; the server calls the
rest, from worker threads when the call may read files (``register``, and ``acquire`` when the
weights are not in host memory).

Lifecycle of a version: ``register`` reads and validates the files and makes version N+1 the
current one (the previous one is retired). ``acquire`` pins the current version for a request
(refcount + 1); ``release`` unpins it. A retired version (replaced or unregistered) keeps its slot
and host weights until its last request releases it; then both are freed. Host memory is an LRU
of ``max_cpu_loras`` versions that never evicts a version with running requests, in a slot, or
pinned (so the limit is soft); an evicted version is re-read from its source on next use, and
refused if the files changed since. ``pinned`` also makes a slot the last choice for eviction.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.config import LoRAConfig
from loraplex.errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    NoAdapterSlotError,
)
from loraplex.lora.peft import BaseModelSpec, LoRAWeights, check_magnitudes, load_peft_adapter
from loraplex.lora.slots import LoRASlots
from loraplex.lora.types import AdapterInfo, AdapterState

Loader = Callable[[str, str, BaseModelSpec, LoRAConfig, str | None], LoRAWeights]
_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")  # the proto's rule for adapter names
NAME_RULE = "letters, digits, '-', '_', '.', '/' (1-128 characters, no empty, '.' or '..' segments)"


def check_adapter_name(name: object, base_model_name: str) -> str:
    """``name`` when it follows the proto's rule and is not the base model's name; else AdapterLoadError."""
    if not isinstance(name, str) or not _NAME.match(name) or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise AdapterLoadError(repr(name)[:64], f"adapter names use {NAME_RULE}")
    if name.lower() == base_model_name.lower():
        raise AdapterLoadError(name, "an adapter may not be named like the base model")
    return name


@dataclass(eq=False)
class AdapterVersion:
    """One immutable version of a named adapter; hashed by identity. Mutable fields: bookkeeping."""

    name: str
    version: int  # 1, 2, ... per name, never reused (not even after unregister)
    source: str
    revision: str | None
    pinned: bool
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    fingerprint: str  # identity of the files read; checked on reload from source
    trusted: bool  # its source came from the operator (demo, preload): not confined to the roots
    weights: LoRAWeights | None = None  # None: evicted from host memory
    refcount: int = 0  # running requests holding this version
    unloaded: bool = False  # retired: no longer the current version of its name

    @property
    def key(self) -> tuple[str, int]:
        """``(name, version)``: what the prefix cache keys on."""
        return (self.name, self.version)


@dataclass
class RegistryCounts:
    """Gauges and counters for metrics; ``slot_*`` count the GPU-slot tier, ``source_*`` file reads,
    ``cpu_*`` the host cache."""

    lora_slots_total: int = 0
    lora_slots_used: int = 0
    adapters_resident: int = 0
    adapters_cached: int = 0  # current versions in host memory but not in a slot
    adapters_registered: int = 0  # current versions (every name)
    retired_versions: int = 0  # replaced/unregistered versions still held by requests
    slot_loads: int = 0  # host -> device
    slot_load_seconds: float = 0.0
    slot_evictions: int = 0
    source_loads: int = 0  # file reads (register, first use, reload after host eviction)
    source_load_seconds: float = 0.0
    cpu_evictions: int = 0  # host-cache evictions (weights dropped)
    running_by_adapter: dict[str, int] = field(default_factory=dict)


class _NameLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class AdapterRegistry:
    """Named adapters, their versions and tiers; see the module docstring."""

    def __init__(self, cfg: LoRAConfig, base: BaseModelSpec, slots: LoRASlots, loader: Loader = load_peft_adapter,
                 builtin_roots: tuple[str, ...] = ()):
        self.cfg, self.base, self.slots, self._loader = cfg, base, slots, loader
        # what requests may load: the configured roots, adapter_dir and the built-in adapters
        roots = [*cfg.adapter_roots, *([cfg.adapter_dir] if cfg.adapter_dir else []), *builtin_roots]
        self._confined = dataclasses.replace(cfg, adapter_roots=roots)
        self._lock = threading.RLock()
        self._name_locks: dict[str, _NameLock] = {}
        self._current: dict[str, AdapterVersion] = {}
        self._last_version: dict[str, int] = {}
        self._retired: set[AdapterVersion] = set()
        self._cpu: OrderedDict[AdapterVersion, None] = OrderedDict()  # LRU, oldest first
        self._slot_versions: list[AdapterVersion | None] = [None] * slots.max_loras
        self._slot_of: dict[AdapterVersion, int] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # occupied slots, oldest use first
        self._stats = RegistryCounts(lora_slots_total=slots.max_loras)
        self._loading: dict[str, int] = {}  # names whose files are being read now -> readers

    # -- names ---------------------------------------------------------------------------------

    def register(self, name: str, source: str, revision: str | None = None, replace: bool = False,
                 pinned: bool = False, trusted: bool = False) -> AdapterInfo:
        """Reads and validates the adapter, then makes it the current version of ``name``.

        ``trusted``: the operator gave the source (demo adapters, preload), so it need not lie in
        the roots and may be a hub id. Raises ``AdapterExistsError`` (name taken and not
        ``replace``) or ``AdapterLoadError``; on any error the registry is unchanged.
        """
        check_adapter_name(name, self.base.model_name)
        with self._name_lock(name):
            version = self._register_locked(name, source, revision, replace, pinned, trusted)
        with self._lock:
            return self._info(version)

    def unregister(self, name: str) -> None:
        """Removes ``name`` at once; its version's slot and weights go when its last request releases."""
        with self._name_lock(name), self._lock:
            version = self._current.pop(name, None)
            if version is None:
                raise AdapterNotFoundError(name)
            self._retire(version)

    # -- requests ------------------------------------------------------------------------------

    def acquire(self, name: str) -> AdapterVersion:
        """Pins the current version of ``name`` for a new request (refcount + 1).

        May read files: registers ``cfg.adapter_dir/name`` on first use, or re-reads evicted weights
        from the source. Raises ``AdapterNotFoundError`` or ``AdapterLoadError``.
        """
        with self._lock:
            version = self._current.get(name)
            if version is not None:
                version.refcount += 1
        if version is None:
            version = self._first_use(name)
        if version.weights is None:
            try:
                self._reload(version)
            except BaseException:
                self.release(version)
                raise
        return version

    def release(self, version: AdapterVersion) -> None:
        """Unpins ``version`` (refcount - 1); frees it entirely if retired and no longer used."""
        with self._lock:
            if version.refcount <= 0:
                raise ValueError(f"adapter {version.key} released more often than acquired")
            version.refcount -= 1
            if version.refcount == 0:
                if version.unloaded:
                    self._drop(version)
                else:
                    self._trim_cpu()

    # -- slots ---------------------------------------------------------------------------------

    def ensure_resident(self, versions: Iterable[AdapterVersion]) -> dict[AdapterVersion, int]:
        """Slot index of each version, loading into free or least recently used slots as needed.

        Never evicts a version in ``versions``; prefers idle, unpinned victims. Raises
        ``NoAdapterSlotError`` when more than ``max_loras`` distinct versions are asked for.
        Each version must be held (``acquire``) by the caller.
        """
        wanted = list(dict.fromkeys(versions))
        protected = set(wanted)
        with self._lock:
            if len(wanted) > self.slots.max_loras:
                raise NoAdapterSlotError(f"{len(wanted)} adapters in one step, but max_loras="
                                         f"{self.slots.max_loras}")
            out = {}
            for version in wanted:
                if version.weights is None:
                    raise ValueError(f"adapter {version.key} has no weights in host memory: acquire it first")
                slot = self._slot_of.get(version)
                if slot is None:
                    slot = self._place(version, protected)
                self._slot_lru.move_to_end(slot)
                self._touch(version)
                out[version] = slot
            return out

    def slot_of(self, version: AdapterVersion) -> int | None:
        """The slot holding ``version``, or None."""
        with self._lock:
            return self._slot_of.get(version)

    # -- views ---------------------------------------------------------------------------------

    def get(self, name: str) -> AdapterInfo:
        """Info of the current version of ``name``; ``AdapterNotFoundError`` if unknown."""
        with self._lock:
            if name not in self._current:
                raise AdapterNotFoundError(name)
            return self._info(self._current[name])

    def list(self) -> builtins.list[AdapterInfo]:
        """Every registered name's current version, sorted by name."""
        with self._lock:
            return [self._info(v) for _name, v in sorted(self._current.items())]

    def resident_names(self) -> builtins.list[str]:
        """Names with a version in a GPU slot (retired versions still running included), sorted."""
        with self._lock:
            return sorted({v.name for v in self._slot_of})

    def loading_names(self) -> builtins.list[str]:
        """Names whose files are being read right now (load, first use, reload), sorted."""
        with self._lock:
            return sorted(self._loading)

    def counts(self) -> RegistryCounts:
        """A snapshot of the gauges and counters."""
        with self._lock:
            stats = dataclasses.replace(self._stats, running_by_adapter={})
            current = self._current.values()
            stats.lora_slots_used = len(self._slot_of)
            stats.adapters_resident = sum(v in self._slot_of for v in current)
            stats.adapters_cached = sum(v in self._cpu and v not in self._slot_of for v in current)
            stats.adapters_registered = len(self._current)
            stats.retired_versions = len(self._retired)
            for v in [*current, *self._retired]:
                if v.refcount:
                    stats.running_by_adapter[v.name] = stats.running_by_adapter.get(v.name, 0) + v.refcount
            return stats

    def consistency_errors(self) -> builtins.list[str]:
        """Broken invariants (empty when consistent); for tests and debugging."""
        with self._lock:
            errors = []
            for slot, v in enumerate(self._slot_versions):
                if v is not None and (self._slot_of.get(v) != slot or v.weights is None or slot not in self._slot_lru):
                    errors.append(f"slot {slot}: {v.key} inconsistent")
                if v is None and (slot in self._slot_lru or self.slots.ranks[slot]):
                    errors.append(f"slot {slot}: free but marked used")
            for v in self._cpu:
                if v.weights is None:
                    errors.append(f"{v.key}: in host cache without weights")
            live = set(self._current.values()) | self._retired
            errors += [f"{v.key}: held but not live" for v in [*self._slot_of, *self._cpu] if v not in live]
            errors += [f"{v.key}: retired flag/refcount wrong" for v in self._retired
                       if not v.unloaded or v.refcount <= 0]
            errors += [f"{v.key}: current but unloaded" for v in self._current.values() if v.unloaded]
            return errors

    # -- internals (call with self._lock held unless noted) ------------------------------------

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        """Serialises operations on one name; take it before (never while holding) ``self._lock``."""
        with self._lock:
            entry = self._name_locks.setdefault(name, _NameLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._name_locks[name]

    def _register_locked(self, name: str, source: str, revision: str | None, replace: bool, pinned: bool,
                         trusted: bool, hold: bool = False) -> AdapterVersion:
        """Loads (without the main lock) and installs a new version, acquired once if ``hold``.

        The name lock must be held.
        """
        with self._lock:
            if name in self._current and not replace:
                raise AdapterExistsError(name)
        weights = self._read(name, source, revision, self._cfg_for(source, trusted))
        with self._lock:
            number = self._last_version.get(name, 0) + 1
            self._last_version[name] = number
            version = AdapterVersion(name, number, source, revision, pinned, weights.rank, weights.alpha,
                                     tuple(sorted(weights.target_modules)), weights.fingerprint, trusted, weights,
                                     refcount=int(hold))
            old = self._current.get(name)
            self._current[name] = version
            self._touch(version)
            if old is not None:
                self._retire(old)
            self._trim_cpu()
            return version

    def _read(self, name: str, source: str, revision: str | None, cfg: LoRAConfig) -> LoRAWeights:
        start = time.perf_counter()
        with self._lock:
            self._loading[name] = self._loading.get(name, 0) + 1
        try:
            weights = self._loader(name, source, self.base, cfg, revision)
            check_magnitudes(weights, self.slots.dtype)
        finally:
            with self._lock:
                self._loading[name] -= 1
                if not self._loading[name]:
                    del self._loading[name]
        with self._lock:
            self._stats.source_loads += 1
            self._stats.source_load_seconds += time.perf_counter() - start
        return weights

    def _first_use(self, name: str) -> AdapterVersion:
        """Registers ``adapter_dir/name`` and acquires it (no lock held on entry)."""
        root = self.cfg.adapter_dir
        if not root or not _DIR_NAME.match(name) or not (Path(root) / name).is_dir():
            raise AdapterNotFoundError(name)
        with self._name_lock(name):
            with self._lock:
                version = self._current.get(name)
            if version is None:
                return self._register_locked(name, str(Path(root) / name), None, False, False, False,
                                             hold=True)
            with self._lock:  # registered meanwhile by another thread
                version.refcount += 1
        return version

    def _reload(self, version: AdapterVersion) -> None:
        """Re-reads an acquired version's evicted weights from its source (no lock held on entry)."""
        with self._name_lock(version.name):
            if version.weights is not None:
                return
            weights = self._read(version.name, version.source, version.revision,
                                 self._cfg_for(version.source, version.trusted))
            if weights.fingerprint != version.fingerprint:
                raise AdapterLoadError(version.name, f"the files at '{version.source}' changed since version "
                                                     f"{version.version} was loaded; load the adapter again")
            with self._lock:
                version.weights = weights
                self._touch(version)
                self._trim_cpu()

    def _cfg_for(self, source: str, trusted: bool) -> LoRAConfig:
        """The confined config, or for an operator-given source one that allows it (its directory, the hub)."""
        if not trusted:
            return self._confined
        roots = [*self._confined.adapter_roots, os.path.realpath(source)]
        return dataclasses.replace(self._confined, adapter_roots=roots, allow_hub_adapters=True, hub_adapter_orgs=[])

    def _touch(self, version: AdapterVersion) -> None:
        if version.weights is not None:
            self._cpu[version] = None
            self._cpu.move_to_end(version)

    def _retire(self, version: AdapterVersion) -> None:
        version.unloaded = True
        if version.refcount == 0:
            self._drop(version)
        else:
            self._retired.add(version)

    def _drop(self, version: AdapterVersion) -> None:
        """Frees a retired version's slot and host weights."""
        slot = self._slot_of.pop(version, None)
        if slot is not None:
            self._free_slot(slot)
            self.slots.clear(slot)
        self._cpu.pop(version, None)
        self._retired.discard(version)
        version.weights = None

    def _free_slot(self, slot: int) -> None:
        self._slot_versions[slot] = None
        self._slot_lru.pop(slot, None)

    def _trim_cpu(self) -> None:
        """Evicts least recently used host weights past ``max_cpu_loras`` (idle, unslotted, unpinned only)."""
        excess = len(self._cpu) - self.cfg.max_cpu_loras
        for version in [v for v in self._cpu if not (v.refcount or v.pinned or v in self._slot_of)][:max(excess, 0)]:
            del self._cpu[version]
            version.weights = None
            self._stats.cpu_evictions += 1

    def _place(self, version: AdapterVersion, protected: set[AdapterVersion]) -> int:
        """Loads ``version`` into a free slot, or evicts the best victim outside ``protected``."""
        assert version.weights is not None
        self.slots.check(version.weights)
        slot = next((s for s, v in enumerate(self._slot_versions) if v is None), None)
        if slot is None:
            slot = self._victim(protected)
            evicted = self._slot_versions[slot]
            assert evicted is not None
            del self._slot_of[evicted]
            self._free_slot(slot)
            self._stats.slot_evictions += 1
        start = time.perf_counter()
        self.slots.load(slot, version.weights)
        self._stats.slot_loads += 1
        self._stats.slot_load_seconds += time.perf_counter() - start
        self._slot_versions[slot] = version
        self._slot_of[version] = slot
        self._slot_lru[slot] = None
        return slot

    def _victim(self, protected: set[AdapterVersion]) -> int:
        """Least recently used slot outside ``protected``, idle and unpinned ones first."""
        order = {s: i for i, s in enumerate(self._slot_lru)}
        candidates = [s for s in self._slot_lru if self._slot_versions[s] not in protected]
        if not candidates:
            raise NoAdapterSlotError(f"all {self.slots.max_loras} adapter slots are in use by this step")

        def rank(s: int) -> tuple[bool, bool, int]:
            v = self._slot_versions[s]
            assert v is not None
            return (v.refcount > 0, v.pinned, order[s])
        return min(candidates, key=rank)

    def _info(self, version: AdapterVersion) -> AdapterInfo:
        if version in self._slot_of:
            state = AdapterState.RESIDENT
        elif version.weights is not None:
            state = AdapterState.CACHED
        else:
            state = AdapterState.REGISTERED
        return AdapterInfo(name=version.name, version=version.version, source=version.source, rank=version.rank,
                           state=state, pinned=version.pinned, running_requests=version.refcount,
                           alpha=version.alpha, target_modules=version.target_modules)
