"""The OpenAPI document against the live API: Schemathesis (stateless, every built-in check, bounded
examples) sends generated requests to a real uvicorn over real Tansu and Redis, with an
`events:write` key; any finding fails the test. Plus what the document must say."""

from __future__ import annotations

import time
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.config import SchemathesisConfig

from stream_app.core.events import MAX_CLOCK_SKEW
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.serving.api import create_app
from stream_app.serving.keys import KeyStore, keys_file
from tests.live_api import live
from tests.test_api_security import bearer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live_settings(embedded_servers, tmp_path_factory) -> Settings:
    tag = uuid.uuid4().hex[:12]
    settings = embedded_servers.settings(
        events_topic=f"events-{tag}", metrics_topic=f"metrics-{tag}", dlq_topic=f"events.dlq-{tag}",
        alerts_topic=f"alerts-{tag}", consumer_group=f"group-{tag}", key_prefix=f"sr-{tag}",
        state_dir=tmp_path_factory.mktemp("openapi-state"), api_rate=0,
    )
    kafka.ensure_topics(kafka.target(settings), embedded.topic_partitions(settings))
    return settings


@pytest.fixture(scope="module")
def writer_key(live_settings) -> str:
    return KeyStore(keys_file(live_settings)).add("schemathesis", ["events:write"])


@pytest.fixture(scope="module")
def base_url(live_settings, writer_key):
    with live(live_settings) as base:
        yield base


# The document the live server serves (test_the_live_document_is_this_one); loaded at import because
# Schemathesis makes its test cases at collection time (its fixture loader breaks on pytest 9).
DOCUMENT = create_app(Settings(api_models="pop"), blas_threads=None).openapi()
# A body over the size limit is refused (413) before its events are counted: a rejection too.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@schema.hook
def filter_case(ctx, case):
    """The rules OpenAPI cannot state (the document says them in words): /recommendations takes exactly
    one of user_id or session_id, and an event's ts may be at most MAX_CLOCK_SKEW s ahead of the server's
    clock. Schema-valid cases that break them are not sent as "valid" (the 4xx they get is tested in
    test_api.py); negative cases are all sent."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return True
    if case.operation.path == "/events":
        body = case.body if isinstance(case.body, list) else [case.body]
        late = time.time() + MAX_CLOCK_SKEW
        return not any(isinstance(e, dict) and isinstance(e.get("ts"), (int, float)) and e["ts"] > late for e in body)
    if case.operation.path != "/recommendations":
        return True
    query = case.query or {}
    return ("user_id" in query) != ("session_id" in query)


@schema.parametrize()
@hypothesis_settings(max_examples=100, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_live_api_conforms_to_its_openapi_document(case, base_url, writer_key):
    case.call_and_validate(base_url=base_url, headers=bearer(writer_key))


def test_the_live_document_is_this_one(base_url):
    import httpx

    assert httpx.get(f"{base_url}/openapi.json").json() == DOCUMENT


def test_the_document_declares_parameters_bodies_codes_and_content_types(live_settings):
    doc = create_app(live_settings).openapi()
    recs = doc["paths"]["/recommendations"]["get"]
    assert {p["name"] for p in recs["parameters"]} == {"user_id", "session_id", "k", "model", "include_seen"}
    assert recs["x-parameter-patterns"][0]["pattern"] == r"^context\.[^.]+$"
    assert {"200", "400", "503"} <= set(recs["responses"]) and "422" not in recs["responses"]
    similar = doc["paths"]["/items/{item_id}/similar"]["get"]
    assert any(p["name"] == "item_id" and p["in"] == "path" and p["required"] for p in similar["parameters"])
    events = doc["paths"]["/events"]["post"]
    body = events["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert body[0] == {"$ref": "#/components/schemas/EventIn"} and body[1]["type"] == "array"
    assert set(events["responses"]) >= {"202", "400", "401", "403", "413", "415", "422", "429", "503"}
    assert events["security"] == [{"apiKey": []}]
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "an API key from `streamrec keys add NAME --scope SCOPE`"}
    assert "ts" not in doc["components"]["schemas"]["EventIn"]["required"]
    assert "user_id" in doc["components"]["schemas"]["EventIn"]["required"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    error = doc["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
