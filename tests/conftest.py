"""Shared pytest fixtures."""

import jax
import pytest

# Parity tests compare float32 results against references to ~1e-5; on GPUs XLA would otherwise
# run float32 matmuls in TF32. No effect on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def demo_gguf_path():
    """Path of the demo GGUF (SmolLM2-135M-Instruct Q4_1), fetched once into the jaxinfer cache."""
    from jaxinfer.loading.resolve import DEFAULT_MODEL, resolve_model

    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.kind == "gguf"
    return resolved.path
