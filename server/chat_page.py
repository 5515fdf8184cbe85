"""The built-in chat page at `/`: one self-contained HTML file (no external assets, works offline).

The page talks to the same OpenAI routes any client uses (`/v1/models`, streamed
`/v1/chat/completions`), so it needs no API of its own.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


@functools.cache
def chat_html() -> str:
    """The page's HTML, read once from the package data."""
    return resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")


def add_chat_page(app: FastAPI) -> None:
    """Serves the chat page at `GET /` on `app` (left out of the OpenAPI schema)."""

    @app.get("/", include_in_schema=False)
    async def chat_page():
        # no-cache: a browser revalidates, so a server upgrade never pairs with a stale page.
        return HTMLResponse(chat_html(), headers={"Cache-Control": "no-cache"})
