"""Request guards of the HTTP server: error bodies, body size limit, Host check, API keys (and who is asking).

Kept apart from :mod:`promcse.serving.app` (the routes) so both the routes and the ASGI middleware answer errors
in the same two shapes: ours, and OpenAI's on ``/v1/`` routes.
"""

from typing import Any

from promcse.serving.tenants import METRICS_ONLY, KeyRing, Tenant, digest


class ApiError(Exception):
    """An error answered as JSON with an HTTP status (``param``/``code`` fill OpenAI-style bodies)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


OPENAI_TYPES: dict[int, str] = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                                429: "rate_limit_error", 503: "server_error", 504: "server_error", 500: "server_error"}


def error_body(status: int, message: str, path: str = "", param: str | None = None, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The JSON body of an error: OpenAI's shape on ``/v1/`` routes, ours elsewhere."""
    if path.startswith("/v1/"):
        kind = OPENAI_TYPES.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": {"status": status, "message": message, **extra}}


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared length, or counted while streaming), and
    408 for a body not complete ``timeout_s`` seconds after its headers (a client trickling or stalling).

    The deadline covers the body only: once it is in, the app's later ``receive()`` calls (waiting for a
    disconnect while the model works) are passed through without one. Prompt uploads (``PUT`` under
    :attr:`UPLOAD_PREFIX`) have their own limit, ``upload_bytes`` (default: ``max_bytes``).
    """

    UPLOAD_PREFIX = "/v1/prompts/"

    def __init__(self, app: Any, max_bytes: int, timeout_s: float | None = None, upload_bytes: int | None = None) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.upload_bytes = max_bytes if upload_bytes is None else upload_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        upload = scope.get("method") == "PUT" and scope.get("path", "").startswith(self.UPLOAD_PREFIX)
        limit = self.upload_bytes if upload else self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            message = f"request body over {limit} bytes" if declared.isdigit() else "bad Content-Length"
            status = 413 if declared.isdigit() else 400
            body = error_body(status, message, scope.get("path", ""), code="body_too_large" if status == 413 else None)
            return await JSONResponse(body, status_code=status)(scope, receive, send)
        await self.app(scope, self._limited(receive, limit), send)

    def _limited(self, receive: Any, limit: int) -> Any:
        """``receive`` with the size limit and the body deadline."""
        import asyncio

        from starlette.exceptions import HTTPException

        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        seen, done = 0, False

        async def limited() -> dict[str, Any]:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await (receive() if deadline is None
                                 else asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0)))
            except asyncio.TimeoutError:  # FastAPI re-raises HTTPExceptions from reading the body as they are
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            done = message.get("type") != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        return limited


class GuardMiddleware:
    """ASGI middleware: refuse unknown ``Host`` names, and requests without a configured API key (bearer token);
    record who is asking (the key's :class:`promcse.serving.tenants.Tenant`, ``open_tenant`` with no keys) as
    ``request.state.tenant``."""

    OPEN_PATHS = ("/", "/health")
    METRICS_PATH = "/metrics"

    def __init__(self, app: Any, keys: KeyRing | None, allowed_hosts: tuple[str, ...] | None,
                 open_tenant: Tenant | None = None, metrics_key: str | None = None) -> None:
        self.app, self.keys, self.allowed_hosts = app, keys, allowed_hosts
        self.open_tenant = open_tenant or Tenant()
        self.metrics_keys = None if not metrics_key else KeyRing(((digest(metrics_key), METRICS_ONLY),))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        headers, path = dict(scope.get("headers") or []), scope.get("path", "")
        problem, tenant = self._check(headers, path)
        if problem is None:
            scope.setdefault("state", {})["tenant"] = tenant
            return await self.app(scope, receive, send)
        status, message, code = problem
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = JSONResponse(error_body(status, message, path, code=code), status_code=status, headers=extra)
        await response(scope, receive, send)

    def _check(self, headers: dict[bytes, bytes], path: str) -> tuple[tuple[int, str, str] | None, Tenant | None]:
        """(problem, None), or (None, the caller's tenant)."""
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                return (400, "Host header not allowed for this server", "host_not_allowed"), None
        # Bytes against bytes: a non-ASCII key arrives as its UTF-8 bytes (never decode them as Latin-1 first).
        given = headers.get(b"authorization", b"")
        if path == self.METRICS_PATH and self.metrics_keys is not None and self.metrics_keys.tenant_for(given):
            return None, METRICS_ONLY
        tenant = self.open_tenant if self.keys is None else self.keys.tenant_for(given)
        if tenant is None and path not in self.OPEN_PATHS:
            return (401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key"), None
        if path == self.METRICS_PATH and tenant is not None and not tenant.metrics:
            status = 401 if self.keys is None else 403
            return (status, "metrics need the metrics key or a key with metrics: true", "metrics_key_required"), None
        return None, tenant or Tenant((), admin=False)  # an open path: nothing of any namespace
