"""The reflection worker: one thread owns the reflection engine and runs rewrites and adapter
switches in arrival order, so llama.cpp can reuse the KV cache of the prompt prefix consecutive
rewrites share."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local.adapters import resolve_adapter
from rpo_local.reflect import Reflector, RewriteCancelled, RewriteResult, TextSink

log = logging.getLogger(__package__)  # the daemon's logger: rpo_local.server

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.engine import Engine
    from rpo_local.store import Store


class QueueFull(Exception):
    """As many rewrites wait as the worker may queue (config max_queued_requests)."""


@dataclass(eq=False)  # hashable by identity: the worker keeps a set of the waiting ones
class Job:
    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_leave: Callable[[Job], None] | None = None  # called when it stops waiting: started or cancelled
    what: str = "a job"  # for the log

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()
        if self.on_leave:
            self.on_leave(self)


class ReflectionWorker:
    """One thread that owns the reflection engine: rewrites and adapter switches, in order.

    It reads the daemon's one Store, which gives this thread its own SQLite connection.
    """

    def __init__(self, store: Store, engine: Engine, config: Config) -> None:
        self.store, self.engine, self.config = store, engine, config
        self.limit = config.max_queued_requests
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: set[Job] = set()  # rewrites queued and neither started nor cancelled
        self._running = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = {"done": 0, "failed": 0, "cancelled": 0, "adapter_switches": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rpo-reflection", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        """Rewrites waiting for the worker (cancelled ones no longer count)."""
        with self._lock:
            return len(self._waiting)

    def full(self) -> bool:
        return self.pending() >= self.limit

    def queue_status(self) -> dict:
        with self._lock:
            return {"pending": len(self._waiting), "running": self._running, "limit": self.limit, **self.stats}

    def _leave(self, job: Job) -> None:
        with self._lock:
            self._waiting.discard(job)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self._leave(job)
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                self.stats["cancelled"] += 1
                continue
            with self._lock:
                self._running += 1
            try:
                job.future.set_result(job.run())
                self.stats["done"] += 1
            except RewriteCancelled:
                self.stats["cancelled"] += 1
                job.future.set_exception(RewriteCancelled())
            except BaseException as exc:  # logged once here, with its traceback; the request gets one line
                self.stats["failed"] += 1
                log.error("%s failed", job.what, exc_info=exc)
                job.future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1

    def submit(self, run: Callable[[], Any], what: str) -> Job:
        job = Job(run, what=what)
        self._queue.put(job)
        return job

    def submit_rewrite(
        self, profile: str, generic: str, on_text: TextSink | None = None, deadline: float | None = None
    ) -> Job:
        """Queue a rewrite; past `deadline` (time.monotonic) its remaining pieces keep their text.
        QueueFull when `limit` rewrites already wait."""
        job = Job(lambda: None, on_leave=self._leave, what=f"the rewrite for profile {profile!r}")

        def run() -> RewriteResult:
            self.ensure_adapter(profile)
            self.ensure_style(profile)
            reflector = Reflector(self.store, self.engine, self.config, cancelled=job.cancelled)
            return reflector.rewrite(generic, profile, log=False, on_text=on_text, source="serve", deadline=deadline)

        job.run = run
        with self._lock:
            if len(self._waiting) >= self.limit:
                raise QueueFull(f"{self.limit} rewrites are already waiting (config max_queued_requests)")
            self._waiting.add(job)
        self._queue.put(job)
        return job

    def ensure_adapter(self, profile: str) -> None:
        """Give the engine the profile's active adapter (no base-model reload)."""
        want = resolve_adapter(self.store, profile)
        with self.engine.lock:
            have = self.engine.adapter_path
            if (Path(want) if want else None) != (Path(have) if have else None):
                self.engine.set_adapter(want)
                self.stats["adapter_switches"] += 1

    def ensure_style(self, profile: str) -> None:
        """Give the engine the profile's newest style vector while `style` is on (none: unsteered);
        a rebuilt vector is picked up by the next request, without reloading the model."""
        from rpo_local import style

        want = style.latest_path(profile, self.engine.model_path) if self.config.style else None
        with self.engine.lock:
            have = self.engine.style.path if self.engine.style is not None else None
            if want != have:
                vector = style.read(want) if want else None
                self.engine.set_style(vector, self.config.style_scale, self.config.style_layer_range())

    def switch_adapter(self, profile: str) -> None:
        """Queue a switch to the profile's (new) adapter: it happens between two requests."""
        self.submit(lambda: self.ensure_adapter(profile), f"the adapter switch for profile {profile!r}")
