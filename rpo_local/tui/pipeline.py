"""The chat pipeline behind `rpo chat`, free of any UI: upstream reply, personalized rewrite,
conversation persistence and feedback. The TUI calls it from worker threads.

Every message is stored as soon as it exists (the user's before the upstream is asked), so a
failing upstream or model never loses what the user typed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rpo_local.errors import InputError

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.reflect import Reflector
    from rpo_local.store import Store
    from rpo_local.upstream import Upstream

TextSink = Callable[[str], None]
CONTEXT_MESSAGES = 8  # earlier messages sent to the upstream: the small local model has 2k context


@dataclass
class Turn:
    """One assistant turn as the UI shows it."""

    message_id: int
    generic: str
    rewrite: str
    interaction_id: int | None = None
    trajectory: dict | list | None = None
    retrieved: list[dict] = field(default_factory=list)
    fallback: bool = False
    fallback_reason: str | None = None
    verdict: str | None = None


class ChatPipeline:
    """One profile's chat: `send` asks the upstream, then rewrites its reply in the user's style."""

    def __init__(
        self,
        store: Store,
        config: Config,
        profile: str,
        *,
        upstream: Upstream | None = None,
        reflector: Reflector | None = None,
        upstream_url: str | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.profile = store.ensure_profile(profile).name
        self.upstream = upstream
        self.reflector = reflector
        self.upstream_url = upstream_url
        self.conversation_id: int | None = None
        self._load_lock = threading.Lock()

    # -- models (slow: call from a worker) ------------------------------------------------------

    def ensure_ready(self) -> None:
        """Open the upstream and the reflection model unless they are open already."""
        with self._load_lock:
            if self.upstream is None:
                from rpo_local.upstream import open_upstream

                self.upstream = open_upstream(self.config, url=self.upstream_url)
            if self.reflector is None:
                from rpo_local.session import open_reflector

                self.reflector = open_reflector(self.config, profile=self.profile, store=self.store)

    def upstream_name(self) -> str:
        if self.upstream is not None:
            return self.upstream.name
        return self.upstream_url or self.config.upstream_url or "local"

    def adapter_name(self) -> str:
        """The adapter the profile uses, as shown in the header."""
        from rpo_local.adapters import adapter_in_use

        return adapter_in_use(self.store, self.profile) or "none"

    def apply_adapter(self) -> None:
        """Hot-swap the loaded model to the profile's current adapter (after activate/rollback)."""
        from rpo_local.adapters import resolve_adapter

        if self.reflector is not None:
            self.reflector.engine.set_adapter(resolve_adapter(self.store, self.profile))
            if self.config.style:  # the profile's own style vector, or none
                from rpo_local.style import apply_profile_style

                apply_profile_style(self.reflector.engine, self.config, self.profile)

    def style_name(self) -> str | None:
        """The style vector in use (its file name), "none built" while style is on without one;
        None while style is off."""
        if not self.config.style:
            return None
        engine = self.reflector.engine if self.reflector is not None else None
        vector = engine.style if engine is not None else None
        return vector.path.name if vector is not None and vector.path else "none built (rpo style build)"

    # -- profile and conversations --------------------------------------------------------------

    def switch_profile(self, name: str) -> None:
        """Chat as `name` from now on (call `apply_adapter` next, from a worker)."""
        self.profile = self.store.ensure_profile(name).name
        self.conversation_id = None

    def new_conversation(self) -> None:
        """Start afresh; the conversation row is created with its first message."""
        self.conversation_id = None

    def resume(self, conversation_id: int | None = None) -> int | None:
        """Open a conversation (default: the profile's latest); return its id (None: none yet)."""
        if conversation_id is None:
            latest = self.store.latest_conversation(self.profile)
            if latest is None:
                return None
            conversation_id = latest["id"]
        conv = self.store.get_conversation(conversation_id)
        if conv["profile"] != self.profile:
            self.switch_profile(conv["profile"])
        self.conversation_id = conversation_id
        return conversation_id

    def turns(self) -> list[dict | Turn]:
        """The open conversation as user message dicts and assistant Turns."""
        if self.conversation_id is None:
            return []
        return [
            turn_from_row(self.store, row) if row["role"] == "assistant" else row
            for row in self.store.get_messages(self.conversation_id)
        ]

    # -- one exchange -----------------------------------------------------------------------------

    def add_user_message(self, text: str) -> int:
        text = text.strip()
        if not text:
            raise InputError("the message is empty")
        if self.conversation_id is None:
            self.conversation_id = self.store.create_conversation(self.profile)
        return self.store.add_message(self.conversation_id, "user", text)

    def generic_reply(self) -> str:
        """Ask the upstream to answer the conversation so far (ends with the user's message)."""
        from rpo_local import prompts

        self.ensure_ready()
        rows = self.store.get_messages(self.conversation_id)[-CONTEXT_MESSAGES:]
        messages = [{"role": "system", "content": prompts.GENERIC_SYSTEM}]
        messages += [{"role": r["role"], "content": r["content"]} for r in rows if r["role"] != "system"]
        return self.upstream.chat(messages).text  # type: ignore[union-attr]

    def personalize(self, generic: str, on_text: TextSink | None = None, on_note: TextSink | None = None,
                    cancelled: threading.Event | None = None) -> Turn:
        """Rewrite `generic` in the profile's style and store it as the assistant's turn. Once
        `cancelled` is set, generation stops at the next token (RewriteCancelled)."""
        from rpo_local.reflect import Reflector

        self.ensure_ready()
        assert self.reflector is not None
        reflector = Reflector(self.reflector.store, self.reflector.engine, self.reflector.config, cancelled=cancelled)
        result = reflector.rewrite(generic, self.profile, on_text=on_text, on_note=on_note, source="chat")
        mid = self.store.add_message(
            self.conversation_id, "assistant", result.rewrite, generic=generic,
            interaction_id=result.interaction_id,
        )
        return Turn(
            message_id=mid, generic=generic, rewrite=result.rewrite,
            interaction_id=result.interaction_id, trajectory=result.trajectory,
            retrieved=result.retrieved, fallback=result.fallback, fallback_reason=result.fallback_reason,
        )

    def send(self, text: str, on_text: TextSink | None = None) -> Turn:
        self.add_user_message(text)
        return self.personalize(self.generic_reply(), on_text)

    # -- feedback ---------------------------------------------------------------------------------

    def feedback(self, turn: Turn, verdict: str, edited_text: str | None = None) -> None:
        """Accept, edit or reject a turn; an edit also replaces what the conversation shows."""
        if turn.interaction_id is None:
            raise InputError("this reply was not recorded as an interaction; nothing to rate")
        self.store.add_feedback(turn.interaction_id, verdict, edited_text)
        if verdict == "edited" and edited_text:
            self.store.update_message(turn.message_id, edited_text.strip())
            turn.rewrite = edited_text.strip()
        turn.verdict = verdict


def turn_from_row(store: Store, row: dict) -> Turn:
    """Rebuild an assistant Turn from a stored message (resumed conversations)."""
    return Turn(
        message_id=row["id"],
        generic=row.get("generic") or row["content"],
        rewrite=row["content"],
        interaction_id=row.get("interaction_id"),
        trajectory=row.get("trajectory"),
        retrieved=store.get_items(row.get("retrieved_ids") or []),
        fallback=bool(row.get("fallback")),
        fallback_reason=row.get("fallback_reason"),
        verdict=row.get("verdict"),
    )
