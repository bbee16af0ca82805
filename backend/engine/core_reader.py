"""The serving process's side of the core's output socket: a thread that receives, unpickles and
decodes the core's messages and hands them to the event loop in batches.

The thread is the PULL socket's only user and blocks in ZMQ with the GIL released; the event loop
wakes once per batch (every message that had arrived), not once per message, and never runs
ZMQ's asyncio machinery. The per-request fan-out stays on the loop (``FrontEnd._dispatch``), where
the streams' futures live.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from typing import Any

import zmq

from loraplex.backend.engine import wire

POLL_SECONDS = 0.5  # how often a quiet socket lets the loop check that the core is alive


class CoreReader:
    """Reads ``socket`` on a daemon thread; ``on_batch(messages)`` and ``on_quiet()`` run on ``loop``."""

    def __init__(self, socket: zmq.Socket[bytes], loop: asyncio.AbstractEventLoop,
                 on_batch: Callable[[list[tuple[Any, ...]]], None], on_quiet: Callable[[], None]):
        self._socket = socket
        self._loop = loop
        self._on_batch = on_batch
        self._on_quiet = on_quiet
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="loraplex-core-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2 * POLL_SECONDS) -> None:
        """Stops the thread (within one poll); the socket is then free to close."""
        self._stop = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop:
            if self._socket.poll(int(POLL_SECONDS * 1000)):
                batch = self._drain()
                callback: Callable[..., None] = self._on_batch
                args: tuple[Any, ...] = (batch,)
            else:
                callback, args = self._on_quiet, ()
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop is closed: nobody to hand messages to
                return

    def _drain(self) -> list[tuple[Any, ...]]:
        """Every message already queued, decoded (a step's output rows become ``RequestOutput``s)."""
        batch: list[tuple[Any, ...]] = []
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return batch
            msg = pickle.loads(data)
            if msg[0] == "out":
                msg = ("out", wire.decode_items(msg[1]), msg[2])
            batch.append(msg)
