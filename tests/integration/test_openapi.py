"""The OpenAPI document describes the live API, and a schema-driven fuzzer finds no server error in it."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from shared.batches.batch import BatchRequest
from shared.jobs import JobRequest


def test_openapi_document_is_3_1_and_built_from_the_request_model(api_url):
    document = requests.get(f"{api_url}/openapi.json", timeout=5).json()
    assert document["openapi"].startswith("3.1")
    request_schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = request_schema.pop("$defs")  # models it uses are components of their own
    assert document["components"]["schemas"]["JobRequest"] == request_schema
    assert document["components"]["schemas"]["WebhookSpec"] == nested["WebhookSpec"]
    job = document["components"]["schemas"]["Job"]
    assert "images" not in job["properties"] and "owner" not in job["properties"]
    assert set(document["paths"]) == {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/uploads",
                                      "/healthz", "/readyz", "/v1/jobs/{job_id}/deliveries",
                                      "/v1/jobs/{job_id}/deliveries/{delivery_id}/retry", "/v1/webhooks",
                                      "/v1/webhooks/{endpoint_id}", "/v1/webhooks/secret", "/v1/batches",
                                      "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/results",
                                      "/v1/batches/{batch_id}/errors", "/v1/batches/{batch_id}/cancel",
                                      "/v1/batches/{batch_id}/retry", "/v1/batches/{batch_id}/deliveries",
                                      "/v1/queues"}
    batch_request = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    batch_request.pop("$defs")
    assert document["components"]["schemas"]["BatchRequest"] == batch_request


@pytest.fixture(scope="module")
def fuzz_auth(stack, settings):
    from shared.store.api_keys import KeyStore
    from shared.store.connection import connect

    secret, _ = KeyStore(connect(settings)).create("fuzz", rate_per_s=100_000, burst=100_000)
    return {"Authorization": f"Bearer {secret}"}


def test_fuzzed_requests_never_get_a_server_error(api_url, fuzz_auth):
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 22

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            response = case.call(headers=fuzz_auth, timeout=70)
            case.validate_response(response, checks=[not_a_server_error])

        no_server_error()
