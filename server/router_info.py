"""What a router asks a worker about itself: sglang-router's metadata discovery reads
`/server_info` and `/model_info` (older names: `/get_server_info`, `/get_model_info`) when a
worker registers, to learn the model it serves and how it is parallelised. Without them the
router still routes, under an unknown model id."""

from __future__ import annotations

import jaxinfer


def add_router_info_routes(app, info, front) -> None:
    """Registers the discovery routes on `app` for the model `info` served by `front`."""
    config = getattr(front.engine, "config", None)

    def model_info() -> dict:
        return {"model_path": info.root, "tokenizer_path": info.root, "is_generation": True,
                "served_model_name": info.served_names[0], "max_model_len": info.max_model_len}

    def server_info() -> dict:
        return {"model_path": info.root, "served_model_name": info.served_names[0],
                "tp_size": getattr(config, "tensor_parallel_size", 1),
                "dp_size": getattr(config, "data_parallel_size", 1),
                "max_model_len": info.max_model_len, "version": jaxinfer.__version__}

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, model_info, methods=["GET"], tags=["Server"], include_in_schema=path == "/model_info")
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, server_info, methods=["GET"], tags=["Server"],
                          include_in_schema=path == "/server_info")
