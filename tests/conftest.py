"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def demo_gguf_path():
    """Path of the demo GGUF (SmolLM2-135M-Instruct Q4_1), fetched once into the jaxinfer cache."""
    from jaxinfer.loading.resolve import DEFAULT_MODEL, resolve_model

    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.kind == "gguf"
    return resolved.path
