"""jaxinfer: LLM inference on JAX/XLA."""

__version__ = "0.1.0"
