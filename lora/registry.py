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

Host copies are kept in the slot dtype, pinned when the slots are on CUDA (``LoRASlots.host_copy``).
Two ways into a slot: ``ensure_resident`` places and writes synchronously (the caller's stream
sees the write), and the background path of ``lora.loader`` (``claim_slot`` reserves a slot,
``write_slot`` writes it without waiting, ``slot_status`` says when steps may read it; a version
is ``active`` while admitted requests run on it, and its slot is then never evicted).
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
from loraplex.lora.slot_table import SlotTable
from loraplex.lora.slots import LoRASlots
from loraplex.lora.types import AdapterInfo, AdapterState, LoadTimes, SlotStatus

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
    refcount: int = 0  # requests holding this version (waiting or running)
    unloaded: bool = False  # retired: no longer the current version of its name
    active: int = 0  # admitted requests running on it: its slot is never evicted
    loads: int = 0  # background loads of it in flight (source read or slot write): it is not freed meanwhile

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
    slot_lookups: int = 0  # requests with an adapter, looked up on arrival
    slot_hits: int = 0  # ... whose version was in a GPU slot
    cpu_lookups: int = 0  # ... whose version was in no slot
    cpu_hits: int = 0  # ... of those, with weights in host memory
    loads_in_flight: int = 0  # versions with a background load in flight
    load_times: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)  # stage -> histogram
    running_by_adapter: dict[str, int] = field(default_factory=dict)


class _NameLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class AdapterRegistry:
    """Named adapters, their versions and tiers; see the module docstring."""

    def __init__(self, cfg: LoRAConfig, base: BaseModelSpec, slots: LoRASlots, loader: Loader = load_peft_adapter,
                 builtin_roots: tuple[str, ...] = ()):
        self.cfg, self.base, self.slots = cfg, base, slots
        self.read_source = loader  # reads and validates one adapter from its source (tests may wrap it)
        # what requests may load: the configured roots, adapter_dir and the built-in adapters
        roots = [*cfg.adapter_roots, *([cfg.adapter_dir] if cfg.adapter_dir else []), *builtin_roots]
        self._confined = dataclasses.replace(cfg, adapter_roots=roots)
        self._lock = threading.RLock()
        self._name_locks: dict[str, _NameLock] = {}
        self._current: dict[str, AdapterVersion] = {}
        self._last_version: dict[str, int] = {}
        self._retired: set[AdapterVersion] = set()
        self._cpu: OrderedDict[AdapterVersion, None] = OrderedDict()  # LRU, oldest first
        self._slots = SlotTable(slots)  # the GPU tier, guarded by self._lock
        self._stats = RegistryCounts(lora_slots_total=slots.max_loras)
        self._loading: dict[str, int] = {}  # names whose files are being read now -> readers
        self._source_times = LoadTimes()
        self._step_map: tuple[dict[AdapterVersion, int], int] = ({}, -1)  # step_slots' last map, its generation

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

    def acquire(self, name: str, read: bool = True) -> AdapterVersion:
        """Pins the current version of ``name`` for a new request (refcount + 1).

        May read files: registers ``cfg.adapter_dir/name`` on first use, and (if ``read``) re-reads
        evicted weights from the source; without ``read`` they stay at the source for the background
        loader. Raises ``AdapterNotFoundError`` or ``AdapterLoadError``.
        """
        with self._lock:
            version = self._current.get(name)
            if version is not None:
                version.refcount += 1
        if version is None:
            version = self._first_use(name)
        if version.weights is None and read:
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
                    self._drop_if_free(version)
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
                slots = self._slots
                out[version] = slots.use(version) if version in slots else slots.place(version, protected)
                self._touch(version)
            return out

    def step_slots(self, versions: set[AdapterVersion]) -> dict[AdapterVersion, int]:
        """``ensure_resident`` for the engine's step, without its per-adapter work while nothing moved:
        the last map again (no lock) when no slot changed hands and no write changed state since, and
        the step needs no version outside it. The versions of a step are held and active (never
        evicted or freed meanwhile); they count as used when their requests start and stop
        (``set_active``), not every step. The map may name more versions than asked."""
        last, generation = self._step_map
        if generation == self._slots.generation and last.keys() >= versions:
            return last
        with self._lock:
            out = self.ensure_resident(versions)
            self._step_map = (out, self._slots.generation)
        return out

    def slot_of(self, version: AdapterVersion) -> int | None:
        """The slot holding ``version``, or None."""
        with self._lock:
            return self._slots.slot_of(version)

    # -- background loading (lora.loader drives these) -----------------------------------------

    def lookup(self, version: AdapterVersion) -> None:
        """Counts a request's adapter on arrival: a slot hit, else a host-cache hit or a miss."""
        with self._lock:
            s = self._stats
            s.slot_lookups += 1
            if version in self._slots:
                s.slot_hits += 1
            else:
                s.cpu_lookups += 1
                s.cpu_hits += version.weights is not None

    def slot_status(self, version: AdapterVersion) -> SlotStatus:
        """Whether steps may read ``version``'s slot (READY), or how far its write is."""
        with self._lock:
            return self._slots.status(version)

    def claim_slot(self, version: AdapterVersion) -> int | None:
        """Reserves a slot for ``version`` (weights in host memory, in no slot yet) and counts a load in
        flight until ``write_slot``; None when no slot can be taken now.

        The victim is the least recently used version that no admitted request runs on, no write is
        filling and the scheduler does not want next; a wanted version may evict versions that only
        waiting requests hold, others only versions nobody holds (``SlotTable``).
        """
        with self._lock:
            if version in self._slots or version.weights is None:
                return None
            slot = self._slots.claim(version)
            if slot is not None:
                version.loads += 1
            return slot

    def write_slot(self, version: AdapterVersion, slot: int) -> None:
        """Writes a slot from ``claim_slot`` without waiting (call with no lock held; the claim keeps the
        slot and the weights). On error the slot is given up and the error raised."""
        try:
            fill, seconds = self._slots.write(version, slot)
        except BaseException:
            with self._lock:
                self._slots.abandon(version)
                self._end_load(version)
            raise
        with self._lock:
            self._slots.written(version, fill, seconds)
            self._end_load(version)

    def begin_load(self, version: AdapterVersion) -> None:
        """A background load of ``version`` is queued: it counts as in flight, and the version is not
        freed before ``end_load``."""
        with self._lock:
            version.loads += 1

    def end_load(self, version: AdapterVersion) -> None:
        with self._lock:
            self._end_load(version)

    def load_weights(self, version: AdapterVersion) -> None:
        """Re-reads a held version's evicted weights from its source (no lock held; may take long).
        Raises ``AdapterLoadError`` (the files changed or are refused)."""
        self._reload(version)

    def set_active(self, version: AdapterVersion, delta: int) -> None:
        """An admitted request starts (+1) or stops (-1) running on ``version``: it counts as used now
        (slot and host-cache LRU; ``step_slots`` does not count the steps in between)."""
        with self._lock:
            version.active += delta
            self._slots.touch(version)
            self._touch(version)

    def set_wanted(self, versions: Iterable[AdapterVersion]) -> None:
        """The versions of the requests the scheduler admits next: their slots are kept, and they may
        evict versions that only waiting requests hold."""
        with self._lock:
            self._slots.wanted = set(versions)

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
            return sorted({v.name for v in self._slots.holders()})

    def loading_names(self) -> builtins.list[str]:
        """Names whose files are being read right now (load, first use, reload), sorted."""
        with self._lock:
            return sorted(self._loading)

    def counts(self) -> RegistryCounts:
        """A snapshot of the gauges and counters."""
        with self._lock:
            stats = dataclasses.replace(self._stats, running_by_adapter={})
            current = self._current.values()
            slots = self._slots
            stats.slot_loads, stats.slot_load_seconds, stats.slot_evictions = (slots.loads, slots.load_seconds,
                                                                               slots.evictions)
            stats.lora_slots_used = sum(1 for _ in slots.holders())
            stats.adapters_resident = sum(v in slots for v in current)
            stats.adapters_cached = sum(v in self._cpu and v not in slots for v in current)
            stats.adapters_registered = len(self._current)
            stats.retired_versions = len(self._retired)
            stats.loads_in_flight = sum(v.loads > 0 for v in [*current, *self._retired])
            stats.load_times = {"source": self._source_times.frozen(), "slot": slots.times.frozen()}
            for v in [*current, *self._retired]:
                if v.refcount:
                    stats.running_by_adapter[v.name] = stats.running_by_adapter.get(v.name, 0) + v.refcount
            return stats

    def consistency_errors(self) -> builtins.list[str]:
        """Broken invariants (empty when consistent); for tests and debugging."""
        with self._lock:
            errors = self._slots.errors()
            for v in self._cpu:
                if v.weights is None:
                    errors.append(f"{v.key}: in host cache without weights")
            live = set(self._current.values()) | self._retired
            errors += [f"{v.key}: held but not live" for v in [*self._slots.holders(), *self._cpu] if v not in live]
            errors += [f"{v.key}: retired flag/refcount wrong" for v in self._retired
                       if not v.unloaded or (v.refcount <= 0 and v.loads <= 0)]
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
            weights = self.read_source(name, source, self.base, cfg, revision)
            check_magnitudes(weights, self.slots.dtype)
            weights = self.slots.host_copy(weights)
        finally:
            with self._lock:
                self._loading[name] -= 1
                if not self._loading[name]:
                    del self._loading[name]
        with self._lock:
            seconds = time.perf_counter() - start
            self._stats.source_loads += 1
            self._stats.source_load_seconds += seconds
            self._source_times.observe(seconds)
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
        self._retired.add(version)
        self._drop_if_free(version)

    def _drop_if_free(self, version: AdapterVersion) -> None:
        """Frees a retired version no request holds and no load uses."""
        if version.unloaded and version.refcount == 0 and version.loads == 0:
            self._drop(version)

    def _end_load(self, version: AdapterVersion) -> None:
        version.loads -= 1
        self._drop_if_free(version)
        self._trim_cpu()

    def _drop(self, version: AdapterVersion) -> None:
        """Frees a retired version's slot and host weights."""
        self._slots.free(version)
        self._cpu.pop(version, None)
        self._retired.discard(version)
        version.weights = None

    def _trim_cpu(self) -> None:
        """Evicts least recently used host weights past ``max_cpu_loras`` (idle, unslotted, unpinned only)."""
        excess = len(self._cpu) - self.cfg.max_cpu_loras
        if excess <= 0:
            return
        victims = []
        for v in self._cpu:  # oldest first; stops at the excess, so a cache of thousands costs little
            if not (v.refcount or v.pinned or v.loads or v in self._slots):
                victims.append(v)
                if len(victims) == excess:
                    break
        for version in victims:
            del self._cpu[version]
            version.weights = None
            self._stats.cpu_evictions += 1

    def _info(self, version: AdapterVersion) -> AdapterInfo:
        if version in self._slots:
            state = AdapterState.RESIDENT
        elif version.weights is not None:
            state = AdapterState.CACHED
        else:
            state = AdapterState.REGISTERED
        return AdapterInfo(name=version.name, version=version.version, source=version.source, rank=version.rank,
                           state=state, pinned=version.pinned, running_requests=version.refcount,
                           alpha=version.alpha, target_modules=version.target_modules)
