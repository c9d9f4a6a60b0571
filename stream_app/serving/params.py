"""Request parameters of the lookup API: parsing and checking, and the 4xx error they raise (`ApiError`)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request

from stream_app.core.events import MAX_CONTEXT_KEYS, MAX_ID_CHARS

MAX_K = 1000
FLAG_VALUES = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_INTEGER = re.compile(r"-?[0-9]{1,9}")
RECOMMEND_PARAMS = {"user_id", "session_id", "k", "model", "include_seen"}
SIMILAR_PARAMS = {"k", "model"}


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a message for the caller, response `headers`
    (e.g. Retry-After) and extra JSON fields."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def check_params(request: Request, allowed: set[str]) -> None:
    """Refuse unknown and repeated parameters (context.<key> is always allowed)."""
    unknown = sorted({k for k in request.query_params if k not in allowed and not k.startswith("context.")})
    if unknown:
        raise ApiError(400, f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
                            + (", context.<key>" if "user_id" in allowed else ""))
    for key in allowed:
        if len(request.query_params.getlist(key)) > 1:
            raise ApiError(400, f"{key} is given more than once")


def k_param(request: Request) -> int:
    """The number of answers asked for (1..MAX_K, default 20)."""
    raw = request.query_params.get("k", "20")
    if not _INTEGER.fullmatch(raw):
        raise ApiError(400, f"k must be an integer between 1 and {MAX_K} (got {raw!r})")
    k = int(raw)
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"k must be between 1 and {MAX_K} (got {k})")
    return k


def id_param(request: Request, name: str) -> str | None:
    """A user or session id parameter, None when absent; never empty or overlong."""
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.strip():
        raise ApiError(400, f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ApiError(400, f"{name} must be at most {MAX_ID_CHARS} characters (got {len(value)})")
    return value


def context_params(request: Request) -> dict[str, str]:
    """The query context from `context.<key>=value` parameters."""
    context: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if not key.startswith("context."):
            continue
        name = key[len("context."):]
        if not name:
            raise ApiError(400, "context parameters are named context.<key>, e.g. context.device=ios (got an empty key)")
        if name in context:
            raise ApiError(400, f"context.{name} is given more than once")
        if len(value) > MAX_ID_CHARS:
            raise ApiError(400, f"context.{name} must be at most {MAX_ID_CHARS} characters (got {len(value)})")
        context[name] = value
    if len(context) > MAX_CONTEXT_KEYS:
        raise ApiError(400, f"context must have at most {MAX_CONTEXT_KEYS} keys (got {len(context)})")
    return context


def flag_param(request: Request, name: str) -> bool:
    """A boolean parameter (true/false, 1/0, yes/no, lower case; default false)."""
    raw = request.query_params.get(name, "false")
    if raw not in FLAG_VALUES:
        raise ApiError(400, f"{name} must be true or false (got {raw!r})")
    return FLAG_VALUES[raw]
