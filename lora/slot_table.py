"""The registry's GPU tier: which adapter version holds which slot, and how versions come and go.

Not locked itself: the registry calls it with its lock held, except ``write``, whose copies run
without the lock on a slot that ``claim`` reserved. A version is in a slot once placed (``place``:
written at once, the caller's stream sees it) or claimed (``claim``): a claimed slot is WRITING
until its write is enqueued (``written``), then ENQUEUED until the write's event completes (CUDA),
READY after. Victims go least recently used first, idle and unpinned before held or pinned ones,
and never: a version the step needs, one admitted requests run on (``active``), one being
written, one the scheduler wants next (``wanted``), or (for a version not wanted itself) one a
waiting request holds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loraplex.errors import NoAdapterSlotError
from loraplex.lora.slots import LoRASlots, SlotFill
from loraplex.lora.types import LoadTimes, SlotStatus

if TYPE_CHECKING:
    from loraplex.lora.registry import AdapterVersion


class SlotTable:
    def __init__(self, slots: LoRASlots):
        self.slots = slots
        self._versions: list[AdapterVersion | None] = [None] * slots.max_loras
        self._slot_of: dict[AdapterVersion, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # occupied slots, oldest use first
        self._fills: dict[AdapterVersion, tuple[SlotFill | None, float]] = {}  # claimed: (its write, None
        # while writing; claim time)
        self.wanted: set[AdapterVersion] = set()  # the versions the scheduler admits next
        self.times = LoadTimes()  # claim to write complete
        self.loads = 0  # slot writes
        self.load_seconds = 0.0  # host time spent writing (enqueuing, on CUDA)
        self.evictions = 0
        self.generation = 0  # + 1 whenever a slot changes hands or a write's state changes (not on LRU use)

    def __contains__(self, version: object) -> bool:
        return version in self._slot_of

    def holders(self) -> Iterator[AdapterVersion]:
        """Every version in a slot."""
        return iter(self._slot_of)

    def slot_of(self, version: AdapterVersion) -> int | None:
        return self._slot_of.get(version)

    def status(self, version: AdapterVersion) -> SlotStatus:
        if version not in self._slot_of:
            return SlotStatus.NONE
        entry = self._fills.get(version)
        if entry is None:
            return SlotStatus.READY
        fill, started = entry
        if fill is None:
            return SlotStatus.WRITING
        if not fill.done():
            return SlotStatus.ENQUEUED
        self._complete(version, started)
        return SlotStatus.READY

    def touch(self, version: AdapterVersion) -> None:
        """Counts a slotted version as just used (LRU), without any other change."""
        slot = self._slot_of.get(version)
        if slot is not None:
            self._lru.move_to_end(slot)

    def use(self, version: AdapterVersion) -> int:
        """The slot of a slotted version that a step is about to read: the caller's stream waits for
        a write still in flight (it must be enqueued), and the slot counts as just used."""
        entry = self._fills.get(version)
        if entry is not None:
            fill, started = entry
            if fill is None:
                raise RuntimeError(f"adapter {version.key}: its slot is still being written")
            fill.order_before()
            self._complete(version, started)
        slot = self._slot_of[version]
        self._lru.move_to_end(slot)
        return slot

    def place(self, version: AdapterVersion, protected: set[AdapterVersion]) -> int:
        """Writes ``version`` into a free slot or over the best victim outside ``protected``, for the
        caller's stream; ``NoAdapterSlotError`` when every slot must stay."""
        assert version.weights is not None
        self.slots.check(version.weights)
        slot = self._take(protected, held_too=True)
        if slot is None:
            raise NoAdapterSlotError(f"all {self.slots.max_loras} adapter slots are in use by this step")
        start = time.perf_counter()
        self.slots.load(slot, version.weights)
        self.loads += 1
        self.load_seconds += time.perf_counter() - start
        self._hold(slot, version)
        return slot

    def claim(self, version: AdapterVersion) -> int | None:
        """Reserves a slot for ``version`` (WRITING until ``written``), or None when none may be taken."""
        slot = self._take(set(), held_too=version in self.wanted)
        if slot is not None:
            self._hold(slot, version)
            self._fills[version] = (None, time.perf_counter())
        return slot

    def write(self, version: AdapterVersion, slot: int) -> tuple[SlotFill, float]:
        """Writes a claimed slot without waiting (no lock needed: the claim keeps slot and weights);
        the write and the seconds it took to issue."""
        assert version.weights is not None
        start = time.perf_counter()
        fill = self.slots.fill(slot, version.weights)
        return fill, time.perf_counter() - start

    def written(self, version: AdapterVersion, fill: SlotFill, seconds: float) -> None:
        started = self._fills[version][1]
        self.loads += 1
        self.load_seconds += seconds
        if fill.done():
            self._complete(version, started)
        else:
            self._fills[version] = (fill, started)
            self.generation += 1

    def abandon(self, version: AdapterVersion) -> None:
        """Gives up a claimed slot whose write failed."""
        self._fills.pop(version, None)
        self._release(version)

    def free(self, version: AdapterVersion) -> None:
        """Frees a dropped version's slot, zeroed (on CUDA after any write of it, on the fill stream)."""
        if version in self._slot_of:
            self._fills.pop(version, None)
            self.slots.clear(self._release(version))

    def errors(self) -> list[str]:
        """Broken invariants of the table."""
        errors = []
        for slot, v in enumerate(self._versions):
            if v is not None and (self._slot_of.get(v) != slot or v.weights is None or slot not in self._lru):
                errors.append(f"slot {slot}: {v.key} inconsistent")
            if v is None and (slot in self._lru or self.slots.ranks[slot]):
                errors.append(f"slot {slot}: free but marked used")
        errors += [f"{v.key}: fill without a slot" for v in self._fills if v not in self._slot_of]
        return errors

    # -- internals ---------------------------------------------------------------------------------

    def _take(self, protected: set[AdapterVersion], held_too: bool) -> int | None:
        """A free slot, or the best victim's (evicted), or None."""
        slot = next((s for s, v in enumerate(self._versions) if v is None), None)
        if slot is None:
            slot = self._victim(protected, held_too)
            if slot is not None:
                victim = self._versions[slot]
                assert victim is not None
                self._release(victim)
                self.evictions += 1
        return slot

    def _victim(self, protected: set[AdapterVersion], held_too: bool) -> int | None:
        for version, (fill, started) in list(self._fills.items()):
            if fill is not None and fill.done():  # complete, though no one asked since
                self._complete(version, started)
        best: tuple[bool, bool, int] | None = None
        victim = None
        for order, s in enumerate(self._lru):
            v = self._versions[s]
            assert v is not None
            if v in protected or v.active or v in self._fills or v in self.wanted or (v.refcount and not held_too):
                continue
            rank = (v.refcount > 0, v.pinned, order)
            if best is None or rank < best:
                best, victim = rank, s
        return victim

    def _hold(self, slot: int, version: AdapterVersion) -> None:
        self.generation += 1
        self._versions[slot] = version
        self._slot_of[version] = slot
        self._lru[slot] = None

    def _release(self, version: AdapterVersion) -> int:
        self.generation += 1
        slot = self._slot_of.pop(version)
        self._versions[slot] = None
        self._lru.pop(slot, None)
        return slot

    def _complete(self, version: AdapterVersion, started: float) -> None:
        self.generation += 1
        del self._fills[version]
        self.times.observe(time.perf_counter() - started)
