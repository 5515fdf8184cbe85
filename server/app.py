"""The FastAPI app: OpenAI routes, health, metrics and version over an engine front.

`create_app` takes anything shaped like `AsyncLLMEngine` (`generate`, `call`, `shutdown`, and
`engine` with the model's facts), so tests can serve a fake engine as well as the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

import jaxinfer
from jaxinfer.server.chat import router as chat_router
from jaxinfer.server.chat_page import add_chat_page
from jaxinfer.server.router_info import add_router_info_routes
from jaxinfer.server.completions import router as completions_router
from jaxinfer.server.errors import OpenAIError, install_error_handlers
from jaxinfer.server.metrics import CONTENT_TYPE, MetricsRenderer, sample_engine
from jaxinfer.server.middleware import GuardMiddleware
from jaxinfer.server.responses import router as responses_router
from jaxinfer.server.responses_protocol import DEFAULT_MAX_STORED_RESPONSES, ResponseStore
from jaxinfer.server.serving import ModelInfo, Serving, engine_error
from jaxinfer.server.streaming import ClientDisconnected
from jaxinfer.server.tokenization import router as tokenization_router
from jaxinfer.server.tool_parsers import PARSERS

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the app serves.

    Attributes:
      served_model_names: names clients use for the model; the first is the one answers carry.
      api_key: required as `Authorization: Bearer KEY` on /v1 routes; None leaves them open.
      max_body_bytes: larger request bodies get a 413.
      health_timeout: seconds /health waits for the engine thread to answer.
      shutdown_engine: stop the engine when the app shuts down (after uvicorn drained requests).
      enable_auto_tool_choice: read tool calls out of the model's text when a request lets the
        model choose (`tool_choice` "auto"), with `tool_call_parser`.
      tool_call_parser: the format the model writes tool calls in (server/tool_parsers/).
      max_stored_responses: /v1/responses results kept for `previous_response_id`.
    """

    served_model_names: tuple[str, ...] = ("jaxinfer",)
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    health_timeout: float = 10.0
    shutdown_engine: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES

    def __post_init__(self):
        names = tuple(self.served_model_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}")
        object.__setattr__(self, "served_model_names", names)
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(sorted(PARSERS))}, "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        if self.max_stored_responses < 0:
            raise ValueError(f"max_stored_responses must be >= 0, got {self.max_stored_responses}")


def _ping(engine) -> None:
    """Runs where the engine runs (module-level, so it can be sent to an engine process)."""


def create_app(front, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The app serving `front`.

    Args:
      front: an AsyncLLMEngine (or a fake with the same API) whose `engine` has `tokenizer`,
        `max_model_len`, `model_config.vocab_size`, `model.path`, `metrics`, `scheduler` and
        `block_manager`.
      settings: names, API key and limits.
    """
    info = ModelInfo.from_engine(front.engine, settings.served_model_names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn runs this after it stopped accepting connections and in-flight requests ended.
        if settings.shutdown_engine:
            await asyncio.to_thread(front.shutdown)

    app = FastAPI(title="jaxinfer", version=jaxinfer.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over the jaxinfer engine", strict_content_type=False)
    serving = app.state.serving = Serving(
        front, info, settings.tool_call_parser if settings.enable_auto_tool_choice else None)
    app.state.responses = ResponseStore(settings.max_stored_responses)
    renderer = MetricsRenderer(info.served_names[0])
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request, exc: ClientDisconnected):
        serving.note_disconnect(f"{exc.what} before its answer")
        # Nobody is left to read it; 499 is what proxies log for a request its client closed.
        return Response(status_code=499)

    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       on_disconnect=lambda path: serving.note_disconnect(f"{path} while sending its body"))
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(responses_router)
    app.include_router(tokenization_router)
    add_chat_page(app)
    add_router_info_routes(app, info, front)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": info.created, "owned_by": "jaxinfer", "root": info.root,
                "parent": None, "max_model_len": info.max_model_len}

    @app.get("/v1/models", tags=["OpenAI"])
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in info.served_names]}

    @app.get("/v1/models/{model_id:path}", tags=["OpenAI"])
    async def retrieve_model(model_id: str):
        app.state.serving.resolve_model(model_id)
        return model_card(model_id)

    @app.get("/health", tags=["Server"])
    async def health():
        """200 while the engine thread answers; 503 when it has stopped or is stuck."""
        try:
            await asyncio.wait_for(front.call(_ping), settings.health_timeout)
        except asyncio.TimeoutError:
            raise OpenAIError(503, f"the engine did not answer within {settings.health_timeout} s") from None
        except Exception as e:
            raise engine_error(e) from None
        return Response(status_code=200)

    @app.get("/metrics", tags=["Server"])
    async def metrics():
        try:
            sample = await front.call(sample_engine)
        except Exception as e:
            raise engine_error(e) from None
        return Response(renderer.render(sample, disconnects=serving.disconnects), media_type=CONTENT_TYPE)

    @app.get("/version", tags=["Server"])
    async def version():
        return JSONResponse({"version": jaxinfer.__version__})

    return app
