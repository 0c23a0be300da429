"""The daemon's state and its one operation: personalize a generic reply within the time budget,
record the interaction as the client received it, and never lose the reply."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from rpo_local import __version__, adapters, errors, names, reflect
from rpo_local.server.guard import LOOPBACK_NAMES
from rpo_local.server.request import ApiError
from rpo_local.server.worker import Job, QueueFull, ReflectionWorker

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.embed import Backfill
    from rpo_local.engine import Engine
    from rpo_local.reflect import RewriteResult
    from rpo_local.scheduler import TrainScheduler
    from rpo_local.store import Store
    from rpo_local.upstream import Upstream

MAX_BODY_BYTES = 1_000_000
PIECE_GRACE_S = 10.0  # a piece started within the time budget may take this much longer


@dataclass
class Outcome:
    text: str
    personalized: bool
    reason: str | None
    result: RewriteResult | None = None
    interaction_id: int | None = None


class Daemon:
    """Everything a request needs: store, upstream, the worker, the scheduler, the limits.

    One Store serves the request handlers, the worker, the scheduler and the embedding backfill:
    it gives each thread its own SQLite connection and serializes writes itself.
    """

    def __init__(
        self,
        *,
        store: Store,
        engine: Engine,
        upstream: Upstream,
        config: Config,
        api_key: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.store, self.engine, self.upstream, self.config = store, engine, upstream, config
        self.api_key = api_key or None
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower().strip("[]") for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes
        self.worker = ReflectionWorker(store, engine, config)
        self.scheduler: TrainScheduler | None = None  # set by `rpo serve` unless --no-train
        self.backfill: Backfill | None = None  # set by `rpo serve` for dense/hybrid retrieval
        self.started = time.time()
        self.counts = {"requests": 0, "personalized": 0, "generic": 0, "upstream_errors": 0, "refused_busy": 0}
        self.in_flight = 0  # chat completions being answered (app.InFlight counts them)
        self._count_lock = threading.Lock()
        store.ensure_profile(config.profile)  # a fresh install serves the default profile

    # -- profiles and adapters ------------------------------------------------------------------

    def select_profile(self, model: str | None, header: str | None) -> tuple[str, bool]:
        """The profile a request is for, and whether `model` named it (then it is not an upstream model)."""
        known = {p["name"] for p in self.store.list_profiles()}
        if header and header.strip():
            name, from_model = header.strip(), False
        elif model and model.startswith("rpo:"):
            name, from_model = model[4:], True
        elif model and model in known:
            return model, True
        else:
            return self.config.profile, False
        if reason := names.problem(name):
            raise ApiError(400, f"invalid profile name {name!r}: {reason} ({names.RULE})", code="invalid_profile")
        if name not in known:
            raise ApiError(404, f"unknown profile {name!r}; known: {', '.join(sorted(known))}", code="profile_not_found")
        return name, from_model

    def adapter_label(self, path: str | Path | None) -> str | None:
        return adapters.adapter_label(self.store, path)

    # -- personalization ------------------------------------------------------------------------

    @property
    def budget_s(self) -> float:
        return self.config.rewrite_timeout_s

    def admit(self) -> None:
        """Refuse a chat completion before any work (503, Retry-After) while the worker's queue is full:
        no upstream call is wasted and nothing is recorded."""
        if self.worker.full():
            self.count("refused_busy")
            raise ApiError(503, f"the daemon is busy: {self.worker.limit} rewrites are waiting; retry shortly",
                           "server_error", "queue_full", headers={"Retry-After": str(self.retry_after_s)})

    @property
    def retry_after_s(self) -> int:
        # Every waiting rewrite has a deadline one time budget after it was queued; past it its
        # pieces keep their text at once, so about one budget later the queue has room again.
        return max(1, math.ceil(self.budget_s))

    def submit_rewrite(self, profile: str, generic: str, **kwargs: Any) -> tuple[Job | None, str | None]:
        """The worker's job, or the reason there is none: the queue filled up since `admit`."""
        try:
            return self.worker.submit_rewrite(profile, generic, deadline=time.monotonic() + self.budget_s, **kwargs), None
        except QueueFull as exc:
            return None, f"no rewrite: {exc}"

    async def personalize(self, profile: str, generic: str) -> Outcome:
        """Rewrite `generic` within the time budget; the generic reply whenever that fails."""
        if not generic.strip():
            return await self.finish(profile, generic, None, "the upstream reply is empty")
        # Pieces not started within the budget keep their generic text; the piece in progress
        # may finish (PIECE_GRACE_S), past which the whole generic reply is returned.
        job, refused = self.submit_rewrite(profile, generic)
        if job is None:
            return await self.finish(profile, generic, None, refused)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=self.budget_s + PIECE_GRACE_S)
        except (TimeoutError, asyncio.CancelledError) as exc:
            job.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return await self.finish(profile, generic, None, f"the rewrite exceeded the time budget ({self.budget_s:g} s)")
        except Exception as exc:  # the worker logged it with its traceback
            return await self.finish(profile, generic, None, f"the rewrite failed: {errors.describe_error(exc)}")
        return await self.finish(profile, generic, result, None)

    async def finish(self, profile: str, generic: str, result: RewriteResult | None, reason: str | None,
                     text: str | None = None) -> Outcome:
        return await run_in_threadpool(self.record, profile, generic, result, reason, text)

    def record(self, profile: str, generic: str, result: RewriteResult | None, reason: str | None,
               text: str | None = None) -> Outcome:
        """Record the interaction as the client received it (`text` overrides what was sent)."""
        row = reflect.interaction_row("serve", generic, result, sent=text, reason=reason, engine=self.engine)
        outcome = Outcome(row["rewrite"], not row["fallback"], row["fallback_reason"], result)
        outcome.interaction_id = self.store.record_interaction(profile, **row)
        self.count("personalized" if outcome.personalized else "generic")
        return outcome

    def count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    def rpo_info(self, profile: str, outcome: Outcome, *, detail: bool, generic: str) -> dict:
        adapter = outcome.result.adapter if outcome.result else (self.engine.adapter_path or None)
        info: dict[str, Any] = {
            "personalized": outcome.personalized, "profile": profile, "adapter": self.adapter_label(adapter),
            "interaction_id": outcome.interaction_id, "fallback_reason": outcome.reason,
        }
        if detail:
            info["generic"] = generic
            info["trajectory"] = outcome.result.trajectory if outcome.result else None
        return info

    def status(self) -> dict:
        return {
            "status": "ok", "version": __version__, "uptime_s": round(time.time() - self.started, 1),
            "profile": self.config.profile, "engine": self.engine.describe(),
            "adapter": self.adapter_label(self.engine.adapter_path),
            "style": str(self.engine.style.path) if getattr(self.engine, "style", None) is not None else None,
            "upstream": getattr(self.upstream, "name", None), "time_budget_s": self.budget_s,
            "queue": self.worker.queue_status(),
            "requests": {**self.counts, "in_flight": self.in_flight},
            "training": self.scheduler.status() if self.scheduler else None,
        }
