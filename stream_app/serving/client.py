"""A small Python client of the lookup API (httpx).

    with RecommenderClient("http://127.0.0.1:8000") as api:
        answer = api.recommendations(user_id="u1", k=10, context={"device": "ios"})
        for item in answer["items"]:
            print(item["item_id"], item["score"], item["reason"])
    with RecommenderClient("http://127.0.0.1:8000", api_key=KEY) as api:   # KEY: `streamrec keys add`
        api.send_events([{"user_id": "u1", "item_id": "i9", "event_type": "click"}])

Errors come back as `ApiError` with the HTTP status and the server's message
(`status == 503` means retry after `retry_after` seconds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from stream_app.core.errors import StreamrecError


class ApiError(StreamrecError):
    """A 4xx/5xx answer: `status`, the server's `message`, and `retry_after` (503) when given."""

    def __init__(self, status: int, message: str, retry_after: float | None = None, body: Any = None):
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.body = body
        super().__init__(f"HTTP {status}: {message}")


class RecommenderClient:
    """`api_key`: sent as `Authorization: Bearer KEY` (POST /events needs one with the `events:write` scope)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 5.0,
                 client: httpx.Client | None = None, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = client or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def _get(self, path: str, params: list[tuple[str, str]]) -> dict:
        return self._check(self._http.get(path, params=tuple(params)))  # a tuple: httpx types its list invariantly

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("error", response.text) if isinstance(body, dict) else response.text
            except ValueError:
                body, message = None, response.text
            retry = response.headers.get("Retry-After")
            raise ApiError(response.status_code, message, float(retry) if retry else None, body)
        return response.json()

    def recommendations(self, user_id: str | None = None, *, session_id: str | None = None, k: int = 20,
                        model: str | None = None, context: Mapping[str, Any] | None = None,
                        include_seen: bool = False) -> dict:
        """Top-k items for a user (or a session): `{"user_id", "model", "model_version", "items"}`."""
        params: list[tuple[str, str]] = [("k", str(k))]
        if user_id is not None:
            params.append(("user_id", user_id))
        if session_id is not None:
            params.append(("session_id", session_id))
        if model is not None:
            params.append(("model", model))
        if include_seen:
            params.append(("include_seen", "true"))
        for key, value in (context or {}).items():
            params.append((f"context.{key}", _text(value)))
        return self._get("/recommendations", params)

    def similar(self, item_id: str, k: int = 20, model: str | None = None) -> dict:
        params = [("k", str(k))] + ([("model", model)] if model else [])
        return self._get(f"/items/{httpx.URL(path=item_id).raw_path.decode()}/similar", params)

    def send_events(self, events: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict:
        """Validate and produce one event or a list; returns `{"accepted", "event_ids"}`."""
        return self._check(self._http.post("/events", json=events))

    def healthz(self) -> dict:
        return self._get("/healthz", [])

    def readyz(self) -> dict:
        """Readiness; raises `ApiError` (503) naming the parts that are not ready."""
        return self._get("/readyz", [])

    def metrics(self) -> str:
        response = self._http.get("/metrics")
        if response.status_code >= 400:
            self._check(response)
        return response.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
