"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis: a real `cifar-cnn serve` on 127.0.0.1 gets
requests generated from /openapi.json for every operation it lists (/predict and /explain among them: odd multipart
bodies, random bytes as the file, every kind of top_k, method and target_class), and no answer may be a 5xx, none
may contradict the documented status codes, content types and response schemas, and the server must still be
healthy afterwards.

Bounded: at most MAX_EXAMPLES generated requests per operation, each with a timeout, against a server this module
starts and stops; the module takes about 15 s on 2 busy cores.

Pillow's decoders are fuzzed more deeply in tests/test_properties.py (mutated files of every format), since
schemathesis sends random bytes as the file, which Pillow refuses at its first byte.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .model_fixtures import Server, tiny_checkpoint

MAX_EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    checkpoint = tiny_checkpoint(tmp_path_factory)
    log = tmp_path_factory.mktemp("fuzz-server") / "serve.log"
    srv = Server(checkpoint, log, "--threads", "1", "--max-upload-mb", "1", "--log-level", "warning")
    yield srv
    srv.stop()
    assert "Traceback" not in log.read_text(), log.read_text()  # nothing failed inside the server either


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests every run: a failure here is a bug, not bad luck
    suppress_health_check=list(HealthCheck),
)
def test_api_from_its_schema(case, fuzz_server: Server) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=30)


def test_schema_documents_every_error_and_the_server_survived(fuzz_server: Server) -> None:
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorMessage"}
    for route in ("/predict", "/explain"):  # the upload routes the fuzzer above was generated for
        responses = spec["paths"][route]["post"]["responses"]
        assert set(responses) == {"200", "400", "413", "422", "503"}, route
        assert all(responses[s]["content"]["application/json"]["schema"] == error for s in ("400", "413", "422", "503"))
    assert httpx.get(f"{fuzz_server.url}/health", timeout=10).json()["status"] == "ok"
    metrics = httpx.get(f"{fuzz_server.url}/metrics", timeout=10).json()
    assert metrics["requests"] > 0 and metrics["rejected"].get("422", 0) > 0  # the fuzzer did reach /predict
