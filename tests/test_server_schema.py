"""`/openapi.json` tells the truth: schemathesis (a client nobody here wrote) generates bodies from the
server's own schema, valid and invalid, and checks every answer against it: no 5xx, only documented statuses
and content types, responses matching their schemas, invalid data refused, valid data accepted.

The server runs over a small random checkpoint with a 64-token context and 16 row slots (a share of 4 per
request), so that every valid body the schema allows is cheap to serve. The run is seeded and derandomized.
The rules across fields that a JSON schema cannot state usably are listed in each body's
`x-cross-field-rules`; a valid-by-schema body the server refuses under one of them (its 400 carries that rule's
`code`) is discarded, not counted as accepted or refused.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency of the server")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")

from schemathesis.checks import load_all_checks, not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from selfrag_engine.testing import write_tiny_checkpoint  # noqa: E402
from tests.server_process import serve  # noqa: E402

CONTEXT = 64
EXAMPLES = 30  # per operation and phase: the whole run stays within a couple of minutes on a 2-core CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("schema-model"), seed=29, max_position_embeddings=CONTEXT)
    with serve("--max-pending", "16", model=model) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    load_all_checks()
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    # Strings are Unicode text: the server refuses a lone surrogate escape (RFC 8259 8.2), which a JSON schema
    # cannot exclude; test_server_limits sends those.
    schema.config.generation.update(max_examples=EXAMPLES, deterministic=True, no_shrink=True, codec="utf-8")
    return schema


CHECKS = [not_a_server_error, openapi_checks.status_code_conformance, openapi_checks.content_type_conformance,
          openapi_checks.response_schema_conformance, openapi_checks.negative_data_rejection,
          openapi_checks.positive_data_acceptance]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def _cross_field_codes(case) -> set[str]:
    found: set[str] = set()
    components = case.operation.schema.raw_schema["components"]["schemas"]

    def walk(node) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                walk(components[node["$ref"].rsplit("/", 1)[1]])
            found.update(node.get("x-cross-field-rules", {}))
            for k, v in node.items():
                if k != "$ref":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(case.operation.definition.raw.get("requestBody", {}))
    return found


def _operations(api_schema):
    return sorted((r.ok() for r in api_schema.get_all_operations()), key=lambda op: op.label)


def test_the_schema_covers_every_route(api_schema):
    labels = {op.label for op in _operations(api_schema)}
    assert labels == {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}",
                      "POST /v1/completions",
                      "POST /v1/chat/completions", "POST /v1/selfrag"}
    raw = api_schema.raw_schema
    assert "422" not in str(raw["paths"]) and "HTTPValidationError" not in str(raw)
    assert raw["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {
        "type": "string"}}}
    for op in ("/v1/completions", "/v1/chat/completions", "/v1/selfrag"):
        assert raw["paths"][op]["post"]["responses"]["400"]["content"]["application/json"]["schema"][
            "properties"]["error"]["required"] == ["message", "type", "param", "code"]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_the_server_answers_as_its_schema_says(api_schema, mode):
    counts = {"sent": 0, "discarded": 0}
    for operation in _operations(api_schema):
        if mode.is_negative and "requestBody" not in operation.definition.raw:
            continue  # nothing to make invalid
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            response = case.call(timeout=60)
            counts["sent"] += 1
            assert "Traceback" not in response.text
            # Valid bodies refused under a documented rule across fields, and requests whose `timeout` (any
            # positive number) passed before the answer: neither accepted nor refused data.
            if mode.is_positive and ((response.status_code == 400 and response.json()["error"]["code"] in
                                      _cross_field_codes(case)) or response.status_code == 408):
                counts["discarded"] += 1
                hypothesis.reject()
            case.validate_response(response, checks=CHECKS)

        check()
    # Each mode put at least two operations' worth of cases to the checks (the rest were discarded above).
    assert counts["sent"] - counts["discarded"] >= 2 * EXAMPLES, counts
