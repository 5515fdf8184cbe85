"""ASGI middleware: the API key check and the request body size limit.

Both run before FastAPI reads or parses a body, so a client without the key or with a huge body
costs no parsing, and the size limit holds for chunked bodies that announce no length.
"""

from __future__ import annotations

import hmac
import json

from jaxinfer.server.errors import error_body


async def _send_error(send, status: int, message: str, code: str | None = None,
                      headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Rejects requests to /v1 without the right bearer key (401) and bodies over the limit (413).

    Args:
      app: the ASGI app to guard.
      api_key: the key clients must send as `Authorization: Bearer KEY`; None disables the check.
      max_body_bytes: the largest request body accepted.
      on_disconnect: called with the path when a client goes away while sending its body.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, on_disconnect=None):
        self.app = app
        self.on_disconnect = on_disconnect
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        # compare_digest on the full header value takes the same time wherever a mismatch is.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
            return await _send_error(send, 401, "Incorrect or missing API key: send it as 'Authorization: Bearer "
                                     "<key>'", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        # Read the whole body here (every route takes JSON, which is parsed whole anyway), so the
        # limit also holds for chunked bodies, then hand it to the app as one message.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self.on_disconnect is not None:
                    self.on_disconnect(scope["path"])
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later messages: http.disconnect when the client goes away

        await self.app(scope, replay_receive, send)

    async def _too_large(self, send):
        await _send_error(send, 413, f"the request body is larger than the server's limit of "
                                     f"{self.max_body_bytes} bytes")
