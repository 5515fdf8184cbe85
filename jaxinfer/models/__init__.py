"""Model families. Every supported model type currently maps onto the Llama-family module."""

from jaxinfer.config import ModelConfig
from jaxinfer.models import llama


def model_module(config: ModelConfig):
    """The module implementing `config.model_type` (forward, compute_logits, param_axes, ...)."""
    return llama
