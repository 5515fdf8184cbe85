"""jaxinfer: LLM inference on JAX/XLA.

`from jaxinfer import LLM, SamplingParams` is the offline API; the engine, models and loaders
live in the subpackages. Imports are lazy so `import jaxinfer` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name):
    if name == "LLM":
        from jaxinfer.llm import LLM
        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        import jaxinfer.sampling_params as sampling_params
        return getattr(sampling_params, name)
    if name == "EngineConfig":
        from jaxinfer.engine.config import EngineConfig
        return EngineConfig
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):
        import jaxinfer.outputs as outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
