"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure path ends here, including FastAPI's own (body validation, unknown routes, wrong
methods), so a client never sees FastAPI's default 422 body or a bare 500 for bad input.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxinfer.server.protocol import ROLES

logger = logging.getLogger(__name__)

# How long a client should wait before retrying when the engine's queue is full.
RETRY_AFTER_SECONDS = 1

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

# Unions whose per-branch pydantic errors read badly; one sentence says what is accepted instead.
_UNION_MESSAGES = {
    "prompt": "must be a non-empty string, a list of strings, a list of token ids (integers >= 0), "
              "or a list of lists of token ids",
    "stop": "must be a string or a list of non-empty strings",
    "content": "must be a string or a list of {'type': 'text', 'text': ...} parts",
    "tool_choice": "must be 'none', 'auto', 'required' or a tool choice object",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape.

    Args:
      status: the HTTP status.
      message: what went wrong, for a human.
      param: the request field at fault, if any.
      code: OpenAI's machine-readable code, if any ("model_not_found", "invalid_api_key", ...).
      headers: extra response headers (Retry-After).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def overloaded(message: str) -> OpenAIError:
    return OpenAIError(503, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def param_of_message(message: str, known: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The field a message starts with ("stop[0]: ..." or "temperature must be ..."), if known."""
    m = re.match(r"([A-Za-z_][A-Za-z_0-9]*)((?:\[\d+\])*)(:?)", message)
    if m and (m.group(1) in known or m.group(3)):
        return m.group(1)
    return None


_OBJECT_TYPES = ("model_attributes_type", "dict_type", "model_type")


def _is_union_branch(part) -> bool:
    # pydantic names the union member it tried after the field: "str", "list[int]", ...
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def _loc_text(loc: tuple) -> str:
    text = ""
    for p in loc:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """One 400 from pydantic's error list: the first problem, located and explained."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})" if detail else
                           "the request body is not valid JSON")
    raw = tuple(first.get("loc", ()))
    # Drop pydantic's own steps: "body", union member names, and the role tag of a message.
    loc = tuple(p for i, p in enumerate(raw) if p != "body" and not _is_union_branch(p)
                and not (p in ROLES and i > 0 and isinstance(raw[i - 1], int)))
    if first.get("type", "").startswith("union_tag_"):
        loc += (first.get("ctx", {}).get("discriminator", "").strip("'") or "role",)
    if not loc:
        if first.get("type") == "missing":
            return bad_request("the request needs a JSON object body (Content-Type: application/json)")
        if first.get("type") in _OBJECT_TYPES:
            return bad_request("the request body must be a JSON object (Content-Type: application/json)")
    param = _loc_text(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") in _OBJECT_TYPES:
        example = " like {\"role\": \"user\", \"content\": \"...\"}" if loc[0] == "messages" else ""
        return bad_request(f"{param}: must be a JSON object{example}", param)
    if message.startswith("Value error, "):
        # Our model validators phrase messages as "field: what is wrong".
        message = message[len("Value error, "):]
        inner = param_of_message(message)
        return bad_request(f"{param}.{message}" if param else message, param or inner)
    named = [p for p in loc if isinstance(p, str)]
    if named and named[-1] in _UNION_MESSAGES and len(errors) > 1 and first.get("type") != "missing":
        return bad_request(f"{param}: {_UNION_MESSAGES[named[-1]]}", param)
    return bad_request(f"{param}: {message}" if param else message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = validation_error(list(exc.errors()))
        return error_response(err.status, err.message, param=err.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read: it must be UTF-8 encoded JSON"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the server log")
