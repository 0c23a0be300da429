"""The request bodies `rpo serve` accepts, as pydantic models: anything else is a 400.

Only text is personalized, so message content is a string or a list of text parts (joined
into one string); null content is allowed only where OpenAI allows it, on an assistant turn
that calls tools. Sampling parameters are checked here and passed on to the upstream as given.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Number = StrictFloat  # strict: "0.7" is refused, 1 is taken


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id... go upstream as they are

    role: Role
    content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str | None:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string or a list of text parts")
        texts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {n} is {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def _content_present(self) -> Message:
        calls_tools = self.role == "assistant" and (self.model_extra or {}).keys() & {"tool_calls", "function_call"}
        if self.content is None and not calls_tools:
            raise ValueError(f"a {self.role} message needs 'content' (a string)")
        return self

    def forwarded(self) -> dict:
        """The message as the upstream gets it: content as one string."""
        return self.model_dump(exclude_unset=True) | {"content": self.content}


class ChatRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")  # options rpo does not use (n, tools...) are not an error

    messages: Annotated[list[Message], Field(min_length=1)]
    model: StrictStr | None = None
    stream: StrictBool = False
    rpo_trajectory: StrictBool = False
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: Any = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop: Any) -> str | list[str] | None:
        if stop is None or isinstance(stop, str):
            return stop
        if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
            return stop
        raise ValueError("must be a string or a list of up to 4 strings")

    def params(self) -> dict:
        """The sampling parameters the client set (passed on to the upstream)."""
        skip = {"messages", "model", "stream", "rpo_trajectory"}
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if k not in skip}


class FeedbackRequest(BaseModel):
    """POST /v1/rpo/feedback."""

    interaction_id: StrictInt
    verdict: StrictStr
    edited_text: StrictStr | None = None


HINTS = {
    ("messages",): "'messages' is required: a non-empty list of {role, content}",
    ("interaction_id",): "'interaction_id' (an integer) is required",
    ("verdict",): "'verdict' (accepted, edited, rejected) is required",
}


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """(one readable message, the parameter it is about) for the first problem found."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    if not loc:
        return "the request body must be a JSON object", None
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if loc in HINTS and (err["type"] == "missing" or loc == ("messages",)):
        return HINTS[loc], param
    if err["type"] == "value_error":
        message = str(err["ctx"]["error"])
    else:
        message = err["msg"][0].lower() + err["msg"][1:]
    if len(loc) == 2 and loc[0] == "messages" and err["type"] in ("model_type", "missing"):
        message = "each message is an object with a 'role' and 'content'"
    elif loc[-1] == "role":
        message = f"needs a 'role' ({', '.join(Role.__args__)})"
    return f"'{param}': {message}", param
