"""Adapter loads off the engine thread: source -> host memory -> GPU slot.

The scheduler drives it: ``AdapterLoader`` is its ``AdapterGate``. ``lookup`` counts a request's
adapter on arrival (slot hit, host-cache hit or miss); ``prefetch`` starts what the adapter still
needs: a read of its files on a loader thread when its weights left host memory, else a slot
claim and its write (on the calling thread when ``inline``, else on a loader thread). Slots are
claimed on the engine thread only (a read that ends wakes the engine, whose next step claims), so
the slot of a version the scheduler has just found ready cannot go before it is admitted. ``admissible``
says whether a request may run now: its slot is written, or the write is enqueued on the fill
stream and nothing else is running (the step's stream then waits on the write's event in
``assign``; while other requests run, a request waits a step rather than stall them).

A failed load fails only the requests waiting on that version: the engine takes the errors with
``take_failures``. ``wait`` lets an engine whose every request waits on a load sleep until one
finishes instead of spinning.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterable

from loraplex.errors import AdapterLoadError, LoraplexError
from loraplex.lora.registry import AdapterRegistry, AdapterVersion
from loraplex.lora.types import SlotStatus

log = logging.getLogger(__name__)

Task = Callable[[], None]


class AdapterLoader:
    """Background adapter loading over one registry, with ``threads`` loader threads (started on first use)."""

    def __init__(self, registry: AdapterRegistry, threads: int = 2):
        self.registry = registry
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._num_threads = threads
        self._started = False
        self._progress = threading.Condition()  # notified whenever a background load ends
        self._reading: set[AdapterVersion] = set()  # versions with a read task queued or running
        self._failures: list[tuple[AdapterVersion, LoraplexError]] = []
        weakref.finalize(self, _stop_threads, self._tasks, threads)

    # -- the scheduler's gate (engine thread) -----------------------------------------------------

    def lookup(self, version: AdapterVersion) -> None:
        """Counts a new request's adapter: slot hit, host-cache hit or miss."""
        self.registry.lookup(version)

    def prefetch(self, version: AdapterVersion, inline: bool = False) -> None:
        """Starts loading ``version`` toward a slot unless it is there or on its way; returns at once
        unless ``inline`` (then a slot write from host memory happens on this thread)."""
        if self.registry.slot_status(version) is not SlotStatus.NONE:
            return
        with self._progress:
            if version in self._reading:
                return
            if version.weights is None:
                self._reading.add(version)
                self.registry.begin_load(version)
                self._submit(lambda: self._read(version))
                return
        slot = self.registry.claim_slot(version)
        if slot is None:
            return
        if inline:
            self._write(version, slot)
        else:
            self._submit(lambda: self._write(version, slot))

    def admissible(self, version: AdapterVersion, idle: bool) -> bool:
        """A request on ``version`` may run: its slot is written, or (``idle``: nothing else runs) the
        write is enqueued and the step will wait for it on the device."""
        status = self.registry.slot_status(version)
        return status is SlotStatus.READY or (idle and status is SlotStatus.ENQUEUED)

    def want(self, versions: Iterable[AdapterVersion]) -> None:
        """The versions the scheduler admits next (kept in their slots; see ``AdapterRegistry.set_wanted``)."""
        self.registry.set_wanted(versions)

    def activate(self, version: AdapterVersion) -> None:
        self.registry.set_active(version, 1)

    def deactivate(self, version: AdapterVersion) -> None:
        self.registry.set_active(version, -1)

    def assign(self, versions: set[AdapterVersion]) -> dict[AdapterVersion, int]:
        """The slot of each version of a step (a map that may name more); the current stream waits for
        writes still in flight. No per-adapter work while the slots stay as they were."""
        return self.registry.step_slots(versions)

    # -- the engine -------------------------------------------------------------------------------

    @property
    def has_failures(self) -> bool:
        """Failures wait for ``take_failures`` (read without the lock: a step checks it every time)."""
        return bool(self._failures)

    def take_failures(self) -> list[tuple[AdapterVersion, LoraplexError]]:
        """Versions whose load failed since the last call, with the error for their waiting requests."""
        with self._progress:
            failures, self._failures = self._failures, []
        return failures

    def wait(self, timeout: float) -> None:
        """Sleeps until a background load ends or ``timeout`` seconds pass."""
        with self._progress:
            self._progress.wait(timeout)

    # -- loader threads ---------------------------------------------------------------------------

    def _submit(self, task: Task) -> None:
        if not self._started:
            self._started = True
            for i in range(self._num_threads):
                threading.Thread(target=_work, args=(self._tasks,), name=f"loraplex-adapter-load-{i}",
                                 daemon=True).start()
        self._tasks.put(task)

    def _read(self, version: AdapterVersion) -> None:
        try:
            if version.weights is None and (version.refcount or not version.unloaded):
                self.registry.load_weights(version)
        except Exception as exc:
            self._fail(version, exc)
        finally:
            self.registry.end_load(version)
            with self._progress:
                self._reading.discard(version)
                self._progress.notify_all()

    def _write(self, version: AdapterVersion, slot: int) -> None:
        try:
            self.registry.write_slot(version, slot)
        except Exception as exc:
            self._fail(version, exc)
        finally:
            with self._progress:
                self._progress.notify_all()

    def _fail(self, version: AdapterVersion, exc: Exception) -> None:
        error = exc if isinstance(exc, LoraplexError) else AdapterLoadError(
            version.name, f"version {version.version} could not be loaded ({type(exc).__name__}: {exc})")
        log.warning("loading adapter %s version %d failed: %s", version.name, version.version, error)
        with self._progress:
            self._failures.append((version, error))


def _work(tasks: queue.SimpleQueue[Task | None]) -> None:
    """A loader thread: runs tasks until it gets None (it holds no task between two, so a dropped
    loader is collected and its threads stopped)."""
    while True:
        task = tasks.get()
        if task is None:
            return
        task()
        del task


def _stop_threads(tasks: queue.SimpleQueue[Task | None], threads: int) -> None:
    for _ in range(threads):
        tasks.put(None)
