"""schemathesis against the app's own OpenAPI schema, in process over ASGI, on the real engine:
whatever it sends, valid or not, the answer is never a 5xx."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import MODEL_NAME, shared_stack

MAX_EXAMPLES = int(os.environ.get("JAXINFER_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema():
    stack = shared_stack()
    app = create_app(stack.front, ServerSettings(served_model_names=(MODEL_NAME,)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text


def test_engine_idle_after_fuzzing():
    assert shared_stack().wait_idle() == 0.0
