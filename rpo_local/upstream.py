"""The base model that writes the generic reply: any OpenAI-compatible endpoint, or offline
the local GGUF model itself (without adapter)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rpo_local import prompts
from rpo_local.errors import UpstreamError

if TYPE_CHECKING:
    import httpx

    from rpo_local.config import Config
    from rpo_local.engine import Engine

LOCAL_MODEL_NAME = "local"


@dataclass
class UpstreamReply:
    text: str
    model: str
    usage: dict = field(default_factory=dict)


class Upstream(Protocol):
    name: str

    def chat(self, messages: Sequence[dict], *, model: str | None = None, **params: object) -> UpstreamReply: ...


class OpenAIUpstream:
    """A remote OpenAI-compatible `/chat/completions` endpoint, called with httpx."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str = "gpt-4o-mini", timeout: float = 120.0) -> None:
        import httpx

        self.name = base_url
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout)

    def chat(self, messages: Sequence[dict], *, model: str | None = None, **params: object) -> UpstreamReply:
        import httpx

        body = {"model": model or self.model, "messages": list(messages), "stream": False}
        body.update({k: v for k, v in params.items() if v is not None})
        try:
            resp = self.client.post("chat/completions", json=body)
        except httpx.TimeoutException:
            raise UpstreamError(f"upstream {self.name} timed out", 504) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {self.name} unreachable: {exc}", 502) from None
        if resp.status_code >= 400:
            raise UpstreamError(f"upstream answered {resp.status_code}: {_error_message(resp)}", resp.status_code)
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(f"upstream {self.name} sent a malformed reply", 502) from None
        return UpstreamReply(text, data.get("model") or body["model"], data.get("usage") or {})

    def close(self) -> None:
        self.client.close()


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        return (err.get("message") if isinstance(err, dict) else str(err)) or resp.text[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]


class LocalUpstream:
    """The local GGUF model as the base model, with no adapter: works with no network at all."""

    name = LOCAL_MODEL_NAME

    def __init__(self, engine: Engine, *, max_tokens: int = 256) -> None:
        self.engine = engine
        self.max_tokens = max_tokens

    def chat(self, messages: Sequence[dict], *, model: str | None = None, **params: object) -> UpstreamReply:
        from rpo_local.engine import Completion

        msgs = list(messages)
        if not msgs or msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": prompts.GENERIC_SYSTEM}, *msgs]
        prompt = prompts.render_chat(self.engine.chat_template(), msgs)
        max_tokens = int(params.get("max_tokens") or self.max_tokens)
        result = Completion()
        try:
            stop = [prompts.end_of_turn(self.engine.chat_template())]
            text = "".join(self.engine.stream(prompt, max_tokens=max_tokens, stop=stop, result=result))
        except Exception as exc:  # llama.cpp errors surface as generic exceptions
            raise UpstreamError(f"local base model failed: {exc}", 500) from None
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        return UpstreamReply(text.strip(), LOCAL_MODEL_NAME, usage)


def open_upstream(config: Config, *, url: str | None = None, engine_factory=None) -> Upstream:
    """The configured upstream. The local one loads its own engine (no adapter) on first use."""
    url = url if url is not None else config.upstream_url
    if url:
        key = os.environ.get("RPO_UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIUpstream(url, api_key=key, model=config.upstream_model, timeout=config.upstream_timeout_s)
    from rpo_local.engine import open_engine

    if engine_factory is not None:
        return LocalUpstream(engine_factory(config))
    return LocalUpstream(open_engine(config, model=config.upstream_local_model or None))
