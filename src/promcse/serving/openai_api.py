"""The OpenAI embeddings API on the promcse server: ``POST /v1/embeddings`` and ``GET /v1/models``.

Request ``{"input": str | [str], "model": NAME, "encoding_format": "float" | "base64", "dimensions": int,
"user": str, "input_type": "query" | "document", "truncate": bool}``; response ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}],
"model": NAME, "model_version": "sha256:...", "usage": {"prompt_tokens": n, "total_tokens": n}}`` (and the
``X-Promcse-Model-Version`` header). Embeddings are L2-normalised (as
OpenAI's are); ``dimensions`` keeps the first d components and renormalises them (OpenAI's shortening; our
models were not trained for it, so expect lower quality than the full vector); ``base64`` is the
little-endian float32 bytes, what the official client requests by default. Errors use OpenAI's body
(``{"error": {"message", "type", "param", "code"}}``, see :func:`promcse.serving.guards.error_body`). ``model`` is
any served model or prompt-store name the key may see, so an OpenAI client picks a domain prompt by name;
``GET /v1/models`` lists those names. ``input_type`` (an extension,
as in other OpenAI-compatible servers; default ``document``) picks a role pair's role (:mod:`promcse.models.roles`):
queries through the query role, passages through the document role; other models ignore it. A text over the
character limit or the model's token limit is refused with 413 unless ``truncate`` (an extension, TEI's name)
is true: then it is cut to the limits and embedded.
"""

import base64
from typing import Any, Literal

import numpy as np

from promcse.encoder.encode import unit_rows
from promcse.serving.guards import ApiError
from promcse.serving.context import ServeContext, check_texts, fast_json


def _schema() -> type:
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    class EmbeddingsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        input: StrictStr | list[StrictStr]
        model: StrictStr
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: StrictInt | None = Field(None, ge=1)
        user: StrictStr | None = None
        input_type: Literal["query", "document"] | None = None
        truncate: StrictBool = False

    return EmbeddingsRequest


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """One embedding as OpenAI sends it: float32 numbers (written as a JSON list by
    :func:`promcse.serving.context.json_bytes`), or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Unit vectors, keeping the first ``dimensions`` components (renormalised) when asked."""
    if dimensions is not None:
        if dimensions > vectors.shape[1]:
            raise ApiError(400, f"dimensions is {dimensions}; this model has {vectors.shape[1]}",
                           param="dimensions", code="invalid_value")
        vectors = vectors[:, :dimensions]
    return unit_rows(vectors).astype(np.float32)


def add_openai_routes(app: Any, ctx: ServeContext) -> None:
    """Add ``POST /v1/embeddings`` and ``GET /v1/models`` to the app."""
    from fastapi import Request

    EmbeddingsRequest = _schema()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> Any:  # type: ignore[valid-type]
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "input must not be empty", param="input", code="invalid_value")
        texts = check_texts(texts, ctx.limits, "input", body.truncate)
        served = await ctx.served(request, body.model)
        entry = ctx.entry(served, body.input_type)
        ctx.fit(texts, entry, "input", body.truncate)
        raw, tokens = await ctx.embed_counted(request, texts, entry)
        vectors = shorten(raw, body.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return fast_json({"object": "list", "data": data, "model": served.name, "model_version": served.version,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, served.headers)

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "promcse"}
                                           for n in ctx.visible_models(ctx.tenant(request))]}
