"""jaxinfer's OpenAI-compatible HTTP server (`jaxinfer serve`) and its client benchmark.

`create_app(front, ServerSettings(...))` builds the FastAPI app over an `AsyncLLMEngine`.
Imports are lazy so that the command line can register `serve` without loading FastAPI.
"""

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name):
    if name in __all__:
        from jaxinfer.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'jaxinfer.server' has no attribute {name!r}")
