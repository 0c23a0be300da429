"""Reading a request (body size, JSON, pydantic model, the profile header) and the OpenAI-style
error every refusal answers with."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, unquote

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from rpo_local.server.schema import describe


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.code, self.param, self.headers)


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refusing more than `limit` bytes (413) before reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def parse(model: type[Any], body: Any) -> Any:
    """`body` as the pydantic `model`, or a 400 naming the first problem."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = describe(exc)
        raise ApiError(400, message, code="invalid_request", param=param) from None


def profile_header(request: Request) -> str | None:
    """X-RPO-Profile as the client sent it: UTF-8 bytes, or percent-encoded as rpo's own
    response headers carry it (a valid name never contains '%')."""
    value = request.headers.get("x-rpo-profile")
    if value is None:
        return None
    try:
        value = value.encode("latin-1").decode("utf-8")  # the server decoded the bytes as latin-1
        return unquote(value, errors="strict") if "%" in value else value
    except UnicodeError:
        raise ApiError(400, "the X-RPO-Profile header is not valid UTF-8", code="invalid_profile") from None


def header_value(value: str) -> str:
    """A name as a header value: percent-encoded outside letters, digits and `-_.~`, so neither
    a newline nor a non-ASCII letter ever reaches the raw header (valid ASCII names read as they are)."""
    return quote(value, safe="-_.")


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}
