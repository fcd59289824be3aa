"""The OpenAPI document: valid 3.1, built from the handlers' own pydantic models, and fuzzed with no 500."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings, start_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.api import ROUTES, openapi_document

FUZZ_KEY = "fuzz-admin-key-0123456789abcdef"
# Small by default so the suite stays fast; raise it for a longer hunt: FLEETPUSH_FUZZ_EXAMPLES=500.
EXAMPLES = int(os.environ.get("FLEETPUSH_FUZZ_EXAMPLES", "25"))
# Reproducible by default; FLEETPUSH_FUZZ_RANDOM=1 explores new inputs on every run.
DERANDOMIZE = not os.environ.get("FLEETPUSH_FUZZ_RANDOM")

# PROTOCOL §6, the table of authenticated routes (healthz, readyz, metrics and openapi.json are served apart).
PROTOCOL_ROUTES = {
    ("post", "/api/v1/auth/login"), ("get", "/api/v1/devices"), ("post", "/api/v1/devices"),
    ("get", "/api/v1/devices/{sn}"), ("get", "/api/v1/devices/{sn}/status"),
    ("post", "/api/v1/devices/{sn}/secret"), ("post", "/api/v1/devices/{sn}/commands"),
    ("post", "/api/v1/commands/{command_id}/cancel"), ("get", "/api/v1/commands"),
    ("get", "/api/v1/commands/{command_id}"), ("post", "/api/v1/broadcasts"), ("get", "/api/v1/connections"),
    ("get", "/api/v1/stats"), ("get", "/api/v1/audit"),
}


def test_document_is_valid_openapi_31_and_covers_the_protocol() -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator==0.9.0 not installed")
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    validator.validate(doc)
    served = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == PROTOCOL_ROUTES
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            needs_token = (method, path) != ("post", "/api/v1/auth/login")
            assert ("security" in op) is needs_token, (method, path)
            assert ("401" in op["responses"]) is needs_token


def test_request_schemas_are_the_models_schemas() -> None:
    doc = openapi_document()
    components = doc["components"]["schemas"]
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        if r.body is None:
            assert "requestBody" not in op, r.path
        else:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{r.body.__name__}"
            model = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            defs = model.pop("$defs", {})
            assert components[r.body.__name__] == model, r.body.__name__
            for name, sub in defs.items():
                assert components[name] == sub, name
        query = [p for p in op.get("parameters", []) if p["in"] == "query"]
        if r.query is None:
            assert query == [], r.path
            continue
        props = r.query.model_json_schema()["properties"]
        assert [p["name"] for p in query] == list(props), r.path
        for p in query:
            prop = props[p["name"]]
            options = [x for x in prop.get("anyOf", [prop]) if x.get("type") != "null"]
            assert len(options) == 1
            expected = {k: v for k, v in options[0].items() if k not in ("title", "default")}
            assert p["schema"] == expected, (r.path, p["name"])
            assert p["required"] is False
        path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert path_params == {seg[1:-1] for seg in r.path.split("/") if seg.startswith("{")}


async def test_served_document_is_the_generated_one(core: Core) -> None:
    async with httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False) as c:
        r = await c.get("/api/v1/openapi.json")
    assert r.status_code == 200 and r.json() == openapi_document()


@pytest.fixture
def threaded_core() -> Iterator[Core]:
    """A live core in its own thread and loop, so a synchronous fuzzer can call it over HTTP."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-core", daemon=True)
    thread.start()
    cfg = make_settings(
        api={"keys": [{"name": "fuzz", "key": FUZZ_KEY, "role": "admin"}], "max_body_bytes": 4096},
        limits={"handler_timeout_s": 5},
    )
    core = asyncio.run_coroutine_threadsafe(start_core(cfg), loop).result(10)

    async def seed() -> None:
        async with httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False,
                                     headers={"Authorization": f"Bearer {FUZZ_KEY}"}) as c:
            for sn in ("R-1", "DOG-1"):
                assert (await c.post("/api/v1/devices", json={"sn": sn, "type": "retail"})).status_code == 201
            r = await c.post("/api/v1/devices/R-1/commands", json={"command": "dance"})
            assert r.status_code == 202

    asyncio.run_coroutine_threadsafe(seed(), loop).result(10)
    try:
        yield core
    finally:
        asyncio.run_coroutine_threadsafe(core.app.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_fuzz_every_operation_finds_no_server_error(threaded_core: Core) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis==4.32.5 not installed")
    import requests  # a dependency of schemathesis

    schema = schemathesis.openapi.from_dict(openapi_document())
    base = threaded_core.http_url
    headers = {"Authorization": f"Bearer {FUZZ_KEY}"}
    tried: list[str] = []
    session = requests.Session()  # keep-alive: one connection for the whole run
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
        )

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def hit(case: Any) -> None:
            response = case.call(base_url=base, headers=headers, timeout=10, session=session)
            what = (case.method, case.formatted_path, response.status_code, response.text[:200],
                    case.as_curl_command()[:600])
            assert response.status_code < 500, what
            if response.status_code >= 400:
                try:
                    body = response.json()
                except ValueError:
                    raise AssertionError(("error reply is not JSON", *what)) from None
                assert body["code"] == response.status_code and isinstance(body["msg"], str), what

        hit()
        tried.append(operation.label)
    assert len(tried) == len(PROTOCOL_ROUTES)
