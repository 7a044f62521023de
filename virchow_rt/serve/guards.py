"""Guards around ``virchow-rt serve``'s application (ASGI middleware): the bearer token, and a JSON 500 for
whatever nothing else handled."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

#: routes answered without a token: what load balancers and orchestrators probe
OPEN_ROUTES = ("/v2/health/ready", "/v2/health/live")
log = logging.getLogger(__name__)


def token_digest(token: str) -> str:
    """The sha256 of a bearer token: what replicas hold and compare (in constant time)."""
    return hashlib.sha256(token.encode()).hexdigest()


class BearerToken:
    """ASGI middleware: every route but :data:`OPEN_ROUTES` needs ``Authorization: Bearer <token>``.

    Holds only the token's sha256 and compares digests in constant time (``hmac.compare_digest``)."""

    def __init__(self, app: Any, digest: str) -> None:
        self.app, self.digest = app, digest

    def allowed(self, scope: dict[str, Any]) -> bool:
        if scope["path"] in OPEN_ROUTES:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = given.partition(" ")
        presented = token_digest(credential.strip()) if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(presented.encode(), self.digest.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        refused = JSONResponse(
            {"error": "this server needs a token: send the header 'Authorization: Bearer <token>'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refused(scope, receive, send)


class CatchAll:
    """ASGI middleware: an exception nothing else handled becomes a 500 with ``{"error": "<one line>"}``
    (the traceback goes to the replica's log), not a plain-text 500 from Ray's proxy."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if scope["type"] != "http" or started:
                raise
            log.exception("virchow-rt serve: %s %s failed", scope.get("method"), scope.get("path"))
            from fastapi.responses import JSONResponse

            where = f"{scope.get('method')} {scope.get('path', '')[:80]}"
            failed = JSONResponse(
                {"error": f"{where}: the server failed ({type(err).__name__}); this is a bug in the server, "
                 "not in the request: report it (the replica's log holds the traceback)"},
                status_code=500,
            )  # fmt: skip
            await failed(scope, receive, send)
