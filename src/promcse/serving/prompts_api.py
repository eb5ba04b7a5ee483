"""The prompt store over HTTP: list prompts, and add, replace or remove one while the server runs.

- ``GET /v1/prompts[?limit=N&after=NAME]`` -> ``{"object": "list", "data": [{"name", "version", "loaded",
  "bytes"}], "has_more", "last_id"}``: the store's prompts the key may see, by name (``bytes``: its own tensors
  when loaded, else null); pages of ``limit`` (1..10,000; default all) after ``after``, so a client walks a large
  store by passing each page's ``last_id`` as the next ``after``;
- ``GET /v1/prompts/NAME`` -> one of those (404 when absent or outside the key's namespace);
- ``PUT /v1/prompts/NAME`` ``{"files": {"config.json": BASE64, "prompt.safetensors": BASE64, ...}}`` (admin) ->
  201 (added) or 200 (replaced) ``{"object": "prompt", "name", "version", "loaded": true, "bytes", "replaced"}``
  and the ``X-Promcse-Model-Version`` header. The files are validated by loading them exactly as a request
  would (:meth:`promcse.serving.store.PromptStore.put`); a model that does not load is 422 and nothing changes;
- ``DELETE /v1/prompts/NAME`` (admin) -> ``{"object": "prompt", "name", "deleted": true}``; 404 when absent.

Admin routes need a key with ``admin: true`` (403 otherwise); with no key configured at all they are refused
unless the server allows admin without keys (:class:`promcse.serving.context.ServeOptions`). An admin key writes
only inside its namespace: a ``PUT`` outside it is 403 whether or not the name exists, a ``DELETE`` outside it is
404 (as for a name that does not exist). Names must match :data:`promcse.serving.store.NAME_RE` (400, param
``name``). A start-up model's name cannot be written (409).
"""

import base64
import binascii
from typing import Any

from promcse.errors import PromcseError
from promcse.serving.context import VERSION_HEADER, ServeContext, fast_json, on_thread
from promcse.serving.guards import ApiError
from promcse.serving.store import NAME_RE, PromptStore


def _schema() -> type:
    from pydantic import BaseModel, ConfigDict, StrictStr

    class PutPrompt(BaseModel):
        model_config = ConfigDict(extra="forbid")

        files: dict[StrictStr, StrictStr]

    return PutPrompt


def decode_files(files: dict[str, str]) -> dict[str, bytes]:
    """``{path: base64}`` -> ``{path: bytes}``; 400 naming the file whose text is not base64."""
    out: dict[str, bytes] = {}
    for rel, text in files.items():
        try:
            out[rel] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"files[{rel[:80]!r}] is not base64", param="files", code="invalid_value") from None
    return out


def admin_store(ctx: ServeContext, request: Any, name: str, write: bool) -> PromptStore:
    """The store, when the caller may change prompt ``name``: 403 without admin, 400 for a bad name, 403 (``PUT``)
    or 404 (``DELETE``) outside the caller's namespace, 404 without a store."""
    tenant = ctx.tenant(request)
    if not tenant.admin:
        message = ("this route needs an API key with admin: true" if ctx.keys is not None else
                   "admin routes are off on a server without API keys; configure keys (one with admin: true), or "
                   "allow admin without keys on a trusted loopback server")
        raise ApiError(403, message, code="admin_required")
    if not NAME_RE.match(name):
        raise ApiError(400, f"bad prompt name {name[:80]!r}: 1-64 letters, digits, '.', '_', '-', starting with a "
                       "letter or digit", param="name", code="invalid_value")
    if not tenant.sees(name):
        if write:
            raise ApiError(403, f"this key may not write prompt {name!r}", param="name", code="outside_namespace")
        raise ApiError(404, f"unknown prompt {name!r}", param="name", code="model_not_found")
    if ctx.store is None:
        raise ApiError(404, "this server has no prompt store", code="no_prompt_store")
    if name in ctx.registry:
        raise ApiError(409, f"{name!r} is a model loaded at start-up; choose another name", param="name",
                       code="name_taken")
    return ctx.store


def write_error(err: PromcseError) -> ApiError:
    """The answer to a refused write: 503 when the store is busy, 400 for names, else 422 (does not load)."""
    if err.key == "store_busy":
        return ApiError(503, err.message, code="store_busy", headers={"Retry-After": "1"})
    if err.key in ("name", "files"):
        return ApiError(400, err.message, param=err.key, code="invalid_value")
    return ApiError(422, f"the prompt does not load: {err.message}", param="files", code="invalid_model")


MAX_PAGE = 10_000  # prompts a GET /v1/prompts page may ask for


def page_of(names: list[str], limit: int | None, after: str | None) -> tuple[list[str], bool]:
    """The sorted ``names`` after ``after`` (exclusive; it need not exist), at most ``limit`` of them (all when
    None), and whether more follow. Each listed prompt's version is hashed (once per folder change), so a page
    of a large store costs only its own prompts' hashing."""
    rest = [n for n in names if after is None or n > after]
    page = rest if limit is None else rest[:limit]
    return page, len(rest) > len(page)


def add_prompt_routes(app: Any, ctx: ServeContext) -> None:
    """Add ``GET /v1/prompts``, ``GET``/``PUT``/``DELETE /v1/prompts/{name}`` to the app."""
    from fastapi import Query, Request

    PutPrompt = _schema()

    @app.get("/v1/prompts")
    async def list_prompts(request: Request, limit: int | None = Query(None, ge=1, le=MAX_PAGE),
                           after: str | None = None) -> dict[str, Any]:
        tenant, store = ctx.tenant(request), ctx.store
        names = [n for n in store.names() if tenant.sees(n)] if store is not None else []
        page, more = page_of(names, limit, after)
        if store is None or not page:
            return {"object": "list", "data": [], "has_more": more, "last_id": None}
        described = await on_thread(ctx.store_worker, lambda: [store.describe(n) for n in page])  # hashing
        data = [d for d in described if d is not None]
        return {"object": "list", "data": data, "has_more": more, "last_id": page[-1]}

    @app.get("/v1/prompts/{name}")
    async def get_prompt(name: str, request: Request) -> dict[str, Any]:
        store = ctx.store
        found = None
        if store is not None and ctx.tenant(request).sees(name) and NAME_RE.match(name):
            found = await on_thread(ctx.store_worker, lambda: store.describe(name))
        if found is None:
            raise ApiError(404, f"unknown prompt {name!r}", param="name", code="model_not_found")
        return found

    @app.put("/v1/prompts/{name}")
    async def put_prompt(name: str, body: PutPrompt, request: Request) -> Any:  # type: ignore[valid-type]
        store = admin_store(ctx, request, name, write=True)
        files = decode_files(body.files)
        try:
            prompt, replaced = await on_thread(ctx.store_worker, lambda: store.put(name, files))
        except PromcseError as err:
            raise write_error(err) from None
        answer = {"object": "prompt", "name": name, "version": prompt.version, "loaded": True,
                  "bytes": prompt.nbytes, "replaced": replaced}
        return fast_json(answer, {VERSION_HEADER: prompt.version}, status=200 if replaced else 201)

    @app.delete("/v1/prompts/{name}")
    async def delete_prompt(name: str, request: Request) -> dict[str, Any]:
        store = admin_store(ctx, request, name, write=False)
        try:
            deleted = await on_thread(ctx.store_worker, lambda: store.delete(name))
        except PromcseError as err:
            raise write_error(err) from None
        if not deleted:
            raise ApiError(404, f"unknown prompt {name!r}", param="name", code="model_not_found")
        return {"object": "prompt", "name": name, "deleted": True}
