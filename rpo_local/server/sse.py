"""A streamed chat completion: server-sent events, the reply piece by piece as it is rewritten."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool

from rpo_local import errors, reflect
from rpo_local.reflect import RewriteCancelled
from rpo_local.server.daemon import Daemon


def completion_id() -> str:
    return f"chatcmpl-rpo-{uuid.uuid4().hex[:24]}"


async def stream(daemon: Daemon, profile: str, reply: Any, model: str, detail: bool) -> AsyncIterator[str]:
    """Server-sent events: the reply piece by piece as it is rewritten, then the rpo fields, then [DONE].

    The time budget runs until text is sent; pieces not started within it keep their generic text.
    """
    cid, created = completion_id(), int(time.time())
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    generic: str = reply.text
    job, refused = None, "the upstream reply is empty"
    if generic.strip():
        job, refused = daemon.submit_rewrite(
            profile, generic, on_text=lambda t: loop.call_soon_threadsafe(events.put_nowait, ("text", t)))
    if job is None:
        outcome = await daemon.finish(profile, generic, None, refused)
        if generic.strip():
            yield chunk({"content": generic})
        info = await run_in_threadpool(daemon.rpo_info, profile, outcome, detail=detail, generic=generic)
        yield chunk({}, "stop", rpo=info)
        yield "data: [DONE]\n\n"
        return
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, ("done", "")))
    sent: list[str] = []
    reason: str | None = None
    finished = False
    deadline = loop.time() + daemon.budget_s
    try:
        while True:
            timeout = None if sent else max(0.0, deadline - loop.time())
            try:
                kind, text = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                job.cancel()
                reason = f"the rewrite exceeded the time budget ({daemon.budget_s:g} s)"
                break
            if kind == "done":
                break
            sent.append(text)
            if text:
                yield chunk({"content": text})
        result = None
        if reason is None:
            exc = job.future.exception() if not job.future.cancelled() else RewriteCancelled()
            if exc is not None:
                reason = f"the rewrite failed: {errors.describe_error(exc)}"
            else:
                result = job.future.result()
        if reason is not None:
            # Never lose the reply: the segments not sent yet follow as the generic reply has them.
            tail = "".join(seg.text for seg in reflect.pieces_of(generic, daemon.config, daemon.engine.adapter_path)[len(sent):])
            sent.append(tail)
            if tail:
                yield chunk({"content": tail})
        outcome = await daemon.finish(profile, generic, result, reason, "".join(sent))
        finished = True
        info = await run_in_threadpool(daemon.rpo_info, profile, outcome, detail=detail, generic=generic)
        yield chunk({}, "stop", rpo=info)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: stop generating, keep the record
            job.cancel()
            # Written in a thread, never on the event loop; not awaited: this task is being cancelled.
            loop.run_in_executor(None, partial(daemon.record, profile, generic, None, "the client disconnected",
                                               "".join(sent) or None))
