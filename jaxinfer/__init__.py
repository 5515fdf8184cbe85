"""jaxinfer: LLM inference on JAX/XLA.

`from jaxinfer import LLM, SamplingParams` is the offline API; the engine, models and loaders
live in the subpackages. Imports are lazy so `import jaxinfer` stays cheap.
"""

import os as _os

__version__ = "0.1.0"

# The layout keeps the HTTP server and the sharding rules in the top-level folders server/ and
# sharding/, but they install as jaxinfer.server and jaxinfer.sharding (pyproject's package-dir),
# so they cannot collide with a user's own `server` or `sharding` module. An installed wheel has
# them in place; run from a source checkout (PYTHONPATH=.), the checkout's root joins this
# package's path so that the same names resolve to those folders.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(_checkout, "server", "__init__.py")):
    __path__.append(_checkout)

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput", "CompletionOutput",
           "Logprob"]


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
